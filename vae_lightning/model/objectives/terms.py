"""What training minimises, per image: the ELBO's terms (the reference notebook's loss) and the
IWAE bound (Burda et al. 2015), from the VAE's methods only, for any likelihood and prior."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vae_lightning.model.likelihoods import at_least_fp32
from vae_lightning.model.noise import Noise, standard_normal
from vae_lightning.model.priors import gaussian_log_density
from vae_lightning.model.vae import VAE


def elbo_terms(model: VAE, x: Tensor, generator: Noise = None) -> tuple[Tensor, Tensor]:
    """Per-image (rec, KL) of one reparameterised pass: -log p(x|z) and the KL (closed-form, or
    estimated at the same z); the reference notebook's loss is their total sum."""
    mu, logvar = model.encode(x)
    z = model.reparameterize(mu, logvar, generator)
    return model.reconstruction_nll(model.decode_logits(z), x), model.kl(mu, logvar, z)


def log_importance_weights(
    model: VAE, x: Tensor, k: int, generator: Noise = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """log w_i = log p(x | z_i) + log p(z_i) - log q(z_i | x) for k draws z_i ~ q(z | x) per image,
    as (log_w, rec, log q - log p) of shape (k, images), with the encoder's (mu, logvar)."""
    mu, logvar = model.encode(x)
    eps = standard_normal((k, *mu.shape), generator, mu.device, mu.dtype)
    z = mu + eps * torch.exp(0.5 * logvar)
    rec = model.reconstruction_nll(model.decode_logits(z), x)  # -log p(x | z_i)
    if model.prior.closed_form:  # N(0, I): for z = mu + std * eps, the (2 pi)^(d/2) of both cancel
        z, eps, logvar32 = at_least_fp32(z), at_least_fp32(eps), at_least_fp32(logvar)
        log_prior_over_posterior = 0.5 * (eps.pow(2) - z.pow(2)).sum(-1) + 0.5 * logvar32.sum(-1)
    else:
        log_prior_over_posterior = model.log_prior(z) - gaussian_log_density(z, mu, logvar)
    return log_prior_over_posterior - rec, rec, -log_prior_over_posterior, mu, logvar


def iwae_terms(model: VAE, x: Tensor, k: int, generator: Noise = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (rec, KL, -L_k): -log p(x|z) averaged over the k samples, the KL (closed-form, or
    its estimate averaged over the k samples), and the
    negative k-sample importance-weighted bound L_k = log (1/k sum_i w_i), the IWAE objective
    (Burda et al. 2015, eq. 8). With k = 1 it is the ELBO, computed exactly as ``elbo_terms``
    (closed-form KL, lower variance), so k = 1 trains as the reference notebook does."""
    if k == 1:
        rec, kl = elbo_terms(model, x, generator)
        return rec, kl, rec + kl
    log_w, rec, kl_at_z, mu, logvar = log_importance_weights(model, x, k, generator)
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)
    kl = model.kl(mu, logvar, mu) if model.prior.closed_form else kl_at_z.mean(0)
    return rec.mean(0), kl, -bound
