"""Free bits (Kingma et al. 2016, "Improved variational inference with inverse autoregressive
flow", eq. 15): the ELBO with the KL of each latent dimension, averaged over the minibatch, held at
no less than ``free_bits`` nats, so that no dimension is pushed below the floor and left unused.
``loss``, ``rec`` and ``kl`` are the true ELBO's terms; the floor changes only what is minimised."""

from __future__ import annotations

import torch

from vae_lightning.model.objectives import OBJECTIVES, Objective
from vae_lightning.model.objectives.terms import at_least_fp32


@OBJECTIVES.register("free_bits")
class FreeBits(Objective):
    reads = ("free_bits",)

    def check(self) -> None:
        floor = self.settings["free_bits"]
        if not (isinstance(floor, int | float) and not isinstance(floor, bool) and floor >= 0):
            raise ValueError(f"model.free_bits={floor!r} is not valid: it must be nats per latent dimension, >= 0")

    def batch(self, model, x, noise, progress):
        if not model.prior.closed_form:  # a KL per dimension needs a prior that factorises over them
            raise ValueError(f"objective=free_bits needs model.prior=normal (a KL per latent dimension), "
                             f"not {model.settings['prior']}")  # fmt: skip
        mu, logvar = model.encode(x)
        z = model.reparameterize(mu, logvar, noise)
        rec = model.reconstruction_nll(model.decode_logits(z), x)
        mu32, logvar32 = at_least_fp32(mu), at_least_fp32(logvar)
        kl_per_dim = -0.5 * (1 + logvar32 - mu32.pow(2) - logvar32.exp())  # Kingma & Welling 2014, appendix B
        kl = kl_per_dim.sum(-1)
        terms = {"loss": rec.detach() + kl.detach(), "rec": rec, "kl": kl}
        if not model.training:
            return None, terms
        # each dimension's KL averaged over the batch, held at the floor or above
        floored = torch.clamp_min(kl_per_dim.mean(0), float(self.settings["free_bits"]))
        return rec.sum() + len(x) * floored.sum(), terms
