"""The leading principal directions of a set of points (the test set's E[z|x]), at a bounded cost."""

from __future__ import annotations

import torch
from torch import Tensor

EXACT_UP_TO = 1024  # points or dimensions: up to this many the exact SVD, beyond it a randomized one


def principal_directions(points: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, the k leading singular values, the k directions as rows, the total sum of squares) of
    ``points`` (N, d) about their mean.

    The exact SVD costs about N * d * min(N, d): minutes for the 10,000 test images of a
    ``model.latent_dim=10000`` run, whose report sat that long with nothing printed. Beyond
    ``EXACT_UP_TO`` a randomized SVD (``torch.pca_lowrank``, Halko et al. 2011) of k + 10 directions
    costs N * d * (k + 10), with a seed of its own so that the report is the same every time."""
    mean = points.mean(0)
    centred = points - mean
    total = centred.pow(2).sum()
    k = min(k, *centred.shape)
    if min(centred.shape) <= EXACT_UP_TO:
        _, s, v = torch.linalg.svd(centred, full_matrices=False)
        return mean, s[:k], v[:k], total
    with torch.random.fork_rng(devices=[]):  # the run's own random numbers are not drawn from
        torch.manual_seed(0)
        _, s, v = torch.pca_lowrank(centred, q=min(k + 10, *centred.shape), center=False, niter=4)
    return mean, s[:k], v[:, :k].T, total
