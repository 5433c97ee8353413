"""beta-TCVAE (Chen et al. 2018, "Isolating sources of disentanglement in VAEs"): the ELBO with
the total correlation of the aggregate posterior, TC = KL(q(z) || prod_j q(z_j)), weighed by
``tc_beta`` (their beta; alpha = gamma = 1). q(z) and q(z_j) are estimated on the batch, log q(z_i)
~ logsumexp_m log q(z_i | x_m) - log M over its M images. Their minibatch-weighted sampling (section
4.1, and their code) divides by N M instead, N the training images: its TC is this one plus the
constant (d - 1) log N, which has no gradient (the same training) but would log about 200 nats of
nothing for 20 latents on MNIST; this one is 0 when q(z) factorises. The KL stays the closed form
(or the prior's estimate), so ``tc_beta = 1`` trains the ELBO; ``tc`` is logged per step and epoch."""

from __future__ import annotations

import math

import torch

from vae_lightning.model.objectives import BOUND_TERMS, OBJECTIVES, Objective
from vae_lightning.model.objectives.terms import at_least_fp32
from vae_lightning.model.priors import LOG_2PI


def total_correlation(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per image, log q(z_i) - sum_j log q(z_ij), q estimated on the batch (Chen et al. 2018, eq. 9 but N = 1)."""
    z, mu, logvar = at_least_fp32(z), at_least_fp32(mu), at_least_fp32(logvar)
    # log q(z_i,j | x_m) for every pair (i, m) and dimension j: (M, M, d)
    per_dim = -0.5 * ((z.unsqueeze(1) - mu.unsqueeze(0)).pow(2) * torch.exp(-logvar.unsqueeze(0))
                      + logvar.unsqueeze(0) + LOG_2PI)  # fmt: skip
    log_m = math.log(len(z))
    log_qz = torch.logsumexp(per_dim.sum(-1), dim=1) - log_m
    log_prod_marginals = (torch.logsumexp(per_dim, dim=1) - log_m).sum(-1)
    return log_qz - log_prod_marginals


@OBJECTIVES.register("beta_tcvae")
class BetaTCVAE(Objective):
    reads, terms = ("tc_beta",), (*BOUND_TERMS, "tc")

    def check(self) -> None:
        beta = self.settings["tc_beta"]
        if not (isinstance(beta, int | float) and not isinstance(beta, bool) and beta >= 0):
            raise ValueError(f"model.tc_beta={beta!r} is not valid: it must be a number >= 0")

    def batch(self, model, x, noise, progress):
        mu, logvar = model.encode(x)
        z = model.reparameterize(mu, logvar, noise)
        rec = model.reconstruction_nll(model.decode_logits(z), x)
        kl = model.kl(mu, logvar, z)
        tc = total_correlation(z, mu, logvar)
        terms = {"loss": rec.detach() + kl.detach(), "rec": rec, "kl": kl, "tc": tc.detach()}
        if not model.training:
            return None, terms
        return rec.sum() + kl.sum() + (float(self.settings["tc_beta"]) - 1.0) * tc.sum(), terms
