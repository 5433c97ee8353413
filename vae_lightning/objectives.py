"""What training minimises, per image: the ELBO's terms (the reference notebook's loss) and the
IWAE bound (Burda et al. 2015), from the VAE's methods only."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vae_lightning.likelihoods import at_least_fp32, bce_from_logits
from vae_lightning.model import VAE
from vae_lightning.priors import kl_divergence


def elbo_terms(model: VAE, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Per-image (BCE, KL) of one reparameterised pass; the reference notebook's loss is their
    total sum."""
    mu, logvar = model.encode(x)
    logits = model.decode_logits(model.reparameterize(mu, logvar, generator))
    return bce_from_logits(logits, x), kl_divergence(mu, logvar)


def log_importance_weights(
    model: VAE, x: Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """log w_i = log p(x | z_i) + log p(z_i) - log q(z_i | x) for k draws z_i ~ q(z | x) per image,
    as (log_w, bce) of shape (k, images), with the encoder's (mu, logvar)."""
    mu, logvar = model.encode(x)
    eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + eps * torch.exp(0.5 * logvar)
    bce = bce_from_logits(model.decode_logits(z), x)  # -log p(x | z_i)
    z, eps, logvar32 = at_least_fp32(z), at_least_fp32(eps), at_least_fp32(logvar)
    # log p(z) - log q(z | x) for z = mu + std * eps; the (2 pi)^(d/2) of both cancel
    log_prior_over_posterior = 0.5 * (eps.pow(2) - z.pow(2)).sum(-1) + 0.5 * logvar32.sum(-1)
    return log_prior_over_posterior - bce, bce, mu, logvar


def iwae_terms(
    model: VAE, x: Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (BCE, KL, -L_k): BCE averaged over the k samples, the closed-form KL, and the
    negative k-sample importance-weighted bound L_k = log (1/k sum_i w_i), the IWAE objective
    (Burda et al. 2015, eq. 8). With k = 1 it is the ELBO, computed exactly as ``elbo_terms``
    (closed-form KL, lower variance), so k = 1 trains as the reference notebook does."""
    if k == 1:
        bce, kl = elbo_terms(model, x, generator)
        return bce, kl, bce + kl
    log_w, bce, mu, logvar = log_importance_weights(model, x, k, generator)
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)
    return bce.mean(0), kl_divergence(mu, logvar), -bound
