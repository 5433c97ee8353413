"""p(z): the standard normal prior, its closed-form KL from q(z|x) and its log-density."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vae_lightning.likelihoods import at_least_fp32


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """Per-image closed-form KL(N(mu, exp(logvar)) || N(0, I)), at least fp32.
    Kingma & Welling 2014, appendix B: -1/2 sum(1 + log sigma^2 - mu^2 - sigma^2)."""
    mu, logvar = at_least_fp32(mu), at_least_fp32(logvar)
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def standard_normal_log_density(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * z.pow(2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
