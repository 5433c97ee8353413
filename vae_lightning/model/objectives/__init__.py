"""What training minimises: one ``Objective`` per ``model.objective``, in the ``OBJECTIVES``
registry (installed plugins add theirs). Each carries what its consumers need: the terms it logs
per step and per epoch (``terms``), the settings it reads and their checks, and the per-image
values and summed loss of a batch. The ELBO and IWAE bound live in ``terms``; each further
objective is one file here (free bits, beta-TCVAE) plus one config in ``conf/model/``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from vae_lightning.model.noise import Noise
from vae_lightning.model.objectives.terms import elbo_terms, iwae_terms, log_importance_weights
from vae_lightning.model.vae import VAE
from vae_lightning.names import TERMS
from vae_lightning.registry import Registry

__all__ = ["OBJECTIVES", "Objective", "elbo_terms", "iwae_terms", "log_importance_weights", "BOUND_TERMS"]

# every objective's first terms, per image (names.TERMS): the negative bound it reports (the ELBO,
# or the IWAE bound), -log p(x|z) and the KL; so runs of any objective sit side by side in every table
BOUND_TERMS = TERMS
# the shared settings (conf/model/vae.yaml) at the values where they change nothing: an objective
# that does not read beta or kl_warmup_epochs refuses any other value (one would think it weighs the
# KL); k is left to the objectives that read it, the others draw one z per image (so that a sweep
# model.objective=elbo,iwae model.k=5 compares the two)
NEUTRAL = {"beta": 1.0, "kl_warmup_epochs": 0, "k": 1}
IGNORED_WHEN_UNREAD = ("k",)


@dataclass(frozen=True)
class Progress:
    """Where training is, for schedules: optimizer steps taken, and steps per epoch."""

    step: int = 0
    steps_per_epoch: int = 1


class Objective:
    """One way to train. Its ``name`` is the one it is registered under (the registry sets it);
    a subclass sets ``reads`` (the ``model.*`` settings it uses),
    ``terms`` (``BOUND_TERMS`` and any of its own, such as beta-TCVAE's ``tc``) and defines
    ``batch``; ``check`` refuses a bad setting in one line (ValueError)."""

    name: str = ""
    reads: tuple[str, ...] = ()
    terms: tuple[str, ...] = BOUND_TERMS

    def __init__(self, **settings: Any) -> None:
        for key, value in settings.items():
            if key in IGNORED_WHEN_UNREAD and key not in self.reads:
                continue
            if key not in self.reads and key in NEUTRAL and value != NEUTRAL[key]:
                raise ValueError(f"model.{key}={value} is not read by objective={self.name} (it reads "
                                 f"{', '.join(self.reads) or 'no setting'}); leave it at {NEUTRAL[key]}")  # fmt: skip
            if key not in self.reads and key not in NEUTRAL:
                raise ValueError(f"model.{key} is not a setting of objective={self.name} "
                                 f"(it reads {', '.join(self.reads) or 'no setting'})")  # fmt: skip
        settings = {**{key: NEUTRAL[key] for key in self.reads if key in NEUTRAL}, **settings}
        missing = [key for key in self.reads if key not in settings]
        if missing:
            raise ValueError(f"objective={self.name} needs model.{missing[0]}: use model={self.name} "
                             f"(conf/model/{self.name}.yaml) or add +model.{missing[0]}=<value>")  # fmt: skip
        self.settings = {key: settings[key] for key in self.reads}
        self.check()

    def check(self) -> None:
        """Refuse impossible settings (ValueError, one line)."""

    def batch(self, model: VAE, x: Tensor, noise: Noise, progress: Progress) -> tuple[Tensor | None, dict[str, Tensor]]:
        """(the loss to backpropagate, summed over the batch as the reference notebook's, or None
        for rec.sum() + kl.sum()) and the per-image value of each of ``terms``. ``model.training``
        tells a training step from an evaluation."""
        raise NotImplementedError

    def step_logs(self, progress: Progress) -> dict[str, float]:
        """Scalars of its schedule to log at a training step (Python floats: no host sync)."""
        return {}

    def loss_and_terms(
        self, model: VAE, x: Tensor, noise: Noise, progress: Progress
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch`` with its loss always given: summed over pixels and over the batch (not a mean),
        as the reference notebook's loss."""
        loss, terms = self.batch(model, x, noise, progress)
        return (terms["rec"].sum() + terms["kl"].sum() if loss is None else loss), terms


OBJECTIVES: Registry[type[Objective]] = Registry("objective", "model.objective")


@OBJECTIVES.register("elbo")
class Elbo(Objective):
    """The reference notebook's loss, -log p(x|z) + KL, with the KL weighed by ``beta``, reached
    linearly from 0 over the first ``kl_warmup_epochs`` (Sonderby et al. 2016). ``loss`` is the
    negative ELBO whatever the weight."""

    reads = ("beta", "kl_warmup_epochs")

    def check(self) -> None:
        beta, warmup = self.settings["beta"], self.settings["kl_warmup_epochs"]
        if not (isinstance(beta, int | float) and not isinstance(beta, bool) and beta >= 0):
            raise ValueError(f"model.beta={beta!r} is not valid: it must be a number >= 0")
        if not (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0):
            raise ValueError(f"model.kl_warmup_epochs={warmup!r} is not valid: it must be an integer >= 0")

    def kl_weight(self, progress: Progress) -> float:
        """The KL's weight at this optimizer step: beta, reached linearly over the warm-up epochs."""
        beta, warmup = float(self.settings["beta"]), self.settings["kl_warmup_epochs"]
        return beta if not warmup else beta * min(1.0, progress.step / (warmup * progress.steps_per_epoch))

    def batch(self, model, x, noise, progress):
        rec, kl = elbo_terms(model, x, noise)
        weight = self.kl_weight(progress) if model.training else 1.0
        loss = None if weight == 1.0 else rec.sum() + weight * kl.sum()
        return loss, {"loss": rec.detach() + kl.detach(), "rec": rec, "kl": kl}

    def step_logs(self, progress: Progress) -> dict[str, float]:
        return {"train/kl_weight": self.kl_weight(progress)} if self.settings["kl_warmup_epochs"] else {}


@OBJECTIVES.register("iwae")
class Iwae(Objective):
    """The k-sample importance-weighted bound (Burda et al. 2015); ``k = 1`` is the ELBO."""

    reads = ("k",)

    def check(self) -> None:
        k = self.settings["k"]
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise ValueError(f"model.k={k!r} is not valid: it must be an integer >= 1 (importance samples per image)")

    def batch(self, model, x, noise, progress):
        rec, kl, neg_bound = iwae_terms(model, x, self.settings["k"], noise)
        return neg_bound.sum(), {"loss": neg_bound, "rec": rec, "kl": kl}


# each further objective registers itself in its own file
from vae_lightning.model.objectives import beta_tcvae, free_bits  # noqa: E402, F401
