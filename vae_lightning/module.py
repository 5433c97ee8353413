"""The LightningModule: the training step of each objective, per-image logging, Adam."""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from vae_lightning.model import VAE, vae_settings_from_hparams
from vae_lightning.names import STAGES, TERMS, metric
from vae_lightning.objectives import elbo_terms, iwae_terms

FUSED_ADAM_DEVICES = ("cpu", "cuda", "mps", "xpu")
# the test pass draws its z from its own generator with this seed: the same weights get the same
# test loss in every run and in ``vae_lightning.eval``
TEST_NOISE_SEED = 0
OBJECTIVES = ("elbo", "iwae")
# the module's own settings (the VAE's are ``VAE.settings``); a checkpoint keeps both
TRAINING_KEYS = ("lr", "fused_adam", "objective", "beta", "kl_warmup_epochs", "k")


class PerImageMean(Metric):
    """The mean of every value it is given: a sum and a count, summed over processes.

    Hand-written because torchmetrics' ``MeanMetric`` either checks for NaN (a host sync per step)
    or, with ``nan_strategy="disable"``, builds and multiplies two weight tensors per update
    (torchmetrics#3434): ~15 us an update on a CPU, three updates a step. Same sums, same result.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0), dist_reduce_fx="sum")  # float, as MeanMetric's weight

    def update(self, values: Tensor) -> None:
        self.total += values.sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        return self.total / self.count


class VAEModule(L.LightningModule):
    """Optimises the summed -log p(x|z) + KL (the reference notebook's BCE + KL) and logs it per image.

    ``objective=elbo`` weighs the KL by ``beta``, ramped up linearly from 0 over the first
    ``kl_warmup_epochs`` (Sonderby et al. 2016); ``objective=iwae`` optimises the k-sample
    importance-weighted bound instead (Burda et al. 2015). ``loss`` is always the negative bound
    the objective trains (the ELBO whatever beta, or the IWAE bound), and rec and KL are logged
    for every objective, so runs with different objectives sit side by side.

    ``train/rec_step`` etc. are the batch's per-image values at every step (returned by
    ``training_step``, logged by ``callbacks.TrainingHistory``); ``train/rec`` etc.
    are the epoch's sum over images divided by images seen (the numbers the reference notebook prints),
    aggregated by ``PerImageMean`` over every image's value, so that they mean the same for
    any batch size and on any number of devices.
    """

    def __init__(
        self,
        vae: VAE | dict | None = None,
        lr: float = 1e-3,
        fused_adam: bool | None = None,
        objective: str = "elbo",
        beta: float = 1.0,
        kl_warmup_epochs: int = 0,
        k: int = 1,
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"model.objective={objective!r} is not one of {', '.join(OBJECTIVES)}")
        if objective == "iwae" and (beta != 1 or kl_warmup_epochs):
            raise ValueError("model.beta and model.kl_warmup_epochs weigh the ELBO's KL; use them with objective=elbo")
        if vae is None:  # the reference notebook's
            vae = VAE()
        elif isinstance(vae, dict):  # its settings, as Lightning's load_from_checkpoint passes them back
            vae = VAE(**vae)
        self.save_hyperparameters(ignore=["vae"])
        self.hparams["vae"] = vae.settings  # plain data: a checkpoint rebuilds its model from it, by name
        self.model = vae
        self.means = nn.ModuleDict({f"{stage}_{term}": PerImageMean() for stage in STAGES for term in TERMS})
        self._logged_this_epoch: set[tuple[str, str]] = set()

    @classmethod
    def from_settings(cls, net: dict | None = None, **settings: Any) -> VAEModule:
        """The module of ``conf/model/*.yaml``: the VAE built from its own settings (the arguments of
        ``model.VAE``, their one source), handed to the module with the rest, the training settings."""
        vae_keys = inspect.signature(VAE).parameters
        vae = VAE(net, **{k: v for k, v in settings.items() if k in vae_keys})
        return cls(vae, **{k: v for k, v in settings.items() if k not in vae_keys})

    @classmethod
    def from_hparams(cls, hparams: dict) -> VAEModule:
        """The module a checkpoint's ``hyper_parameters`` describe (its VAE built again from plain
        settings; checkpoints from before nets were parts included)."""
        training = {k: hparams[k] for k in TRAINING_KEYS if k in hparams}
        return cls(VAE(**vae_settings_from_hparams(hparams)), **training)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the reparameterisation noise is part of the run: a resumed run draws what an
        # uninterrupted one would (the data order is fixed by the seed and epoch already). Every
        # process saves here, rank 0 writes the file: it keeps each process's own generators.
        states = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        every = [states]
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            every = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(every, states)
        checkpoint["rng_states"] = every

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # restored here, not on load: the sanity-check validation in between also draws noise
        saved = getattr(self, "_rng_to_restore", None) or []
        saved = saved if isinstance(saved, list) else [saved]
        if saved:
            # this process's own; with another number of processes the noise cannot match anyway
            states = saved[self.global_rank % len(saved)]
            torch.set_rng_state(states["torch"])
            cuda = states.get("cuda")
            if self.device.type == "cuda" and isinstance(cuda, torch.Tensor):  # (lists: an older format)
                torch.cuda.set_rng_state(cuda, self.device)
            self._rng_to_restore = None
        if self.global_rank >= max(len(saved), 1):
            # every process was seeded alike (build_run), so each would draw the same noise (z's eps,
            # the dynamic binarization) for its own images; process 0 keeps the seed's own stream
            torch.manual_seed((torch.initial_seed() + (self.global_rank << 32)) % 2**64)  # CPU and CUDA

    def on_fit_start(self) -> None:
        # trainer.precision=bf16-true / 16-true converts the whole module, the metrics' running
        # sums included; sums over 60k images need fp32
        for mean in self.means.values():
            mean.set_dtype(torch.float32)

    on_validation_start = on_test_start = on_fit_start

    def on_train_epoch_start(self) -> None:
        self._logged_this_epoch = set()

    on_validation_epoch_start = on_train_epoch_start

    def on_test_epoch_start(self) -> None:
        self._logged_this_epoch = set()
        self._test_noise = torch.Generator(device=self.device).manual_seed(TEST_NOISE_SEED)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.model(x)

    def kl_weight(self) -> float:
        """The KL's weight at this optimizer step: beta, reached linearly over the warm-up epochs."""
        beta, warmup = float(self.hparams.beta), self.hparams.kl_warmup_epochs
        if not warmup:
            return beta
        return beta * min(1.0, self.global_step / (warmup * self.trainer.num_training_batches))

    def _shared_step(
        self, x: Tensor, stage: str, noise: torch.Generator | None = None, kl_weight: float = 1.0
    ) -> dict[str, Tensor]:
        if self.hparams.objective == "iwae":
            rec, kl, neg_bound = iwae_terms(self.model, x, self.hparams.k, noise)
        else:
            (rec, kl), neg_bound = elbo_terms(self.model, x, noise), None
        terms = {"rec": rec.detach(), "kl": kl.detach()}
        terms["loss"] = terms["rec"] + terms["kl"] if neg_bound is None else neg_bound.detach()
        for term, values in terms.items():
            metric_name = metric(stage, term)
            mean = self.means[f"{stage}_{term}"]
            mean.update(values)
            if (stage, term) not in self._logged_this_epoch:
                # Lightning keeps a reference and computes (under DDP, syncs) the metric when
                # the epoch ends, before any epoch-end hook, then resets it. Logging it once per
                # epoch is enough; every step would move the metric to the device each time
                # (docs/performance.md).
                self.log(metric_name, mean, on_step=False, on_epoch=True, prog_bar=term == "loss")
                self._logged_this_epoch.add((stage, term))
        # summed over pixels and over the batch (not a mean), as the reference notebook's loss
        if neg_bound is not None:
            graph_loss = neg_bound.sum()
        elif kl_weight != 1.0:
            graph_loss = rec.sum() + kl_weight * kl.sum()
        else:
            graph_loss = rec.sum() + kl.sum()
        return {"graph_loss": graph_loss, **{t: v.mean() for t, v in terms.items()}}

    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        kl_weight = self.kl_weight()
        out = self._shared_step(batch, "train", kl_weight=kl_weight)
        if self.hparams.kl_warmup_epochs:  # the schedule, in TensorBoard (a Python float: no sync)
            self.log("train/kl_weight", kl_weight, on_step=True, on_epoch=False)
        # Lightning backpropagates "loss": the sum over the batch, not the mean. The step's
        # per-image values go out with it, still on the device; TrainingHistory logs them in
        # blocks (a self.log per step costs more than the step itself on a CPU).
        return {"loss": out["graph_loss"], "rec": out["rec"], "kl": out["kl"], "per_image_loss": out["loss"]}

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._shared_step(batch, "test", self._test_noise)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        fused = self.hparams.fused_adam
        if fused is None:
            fused = self.device.type in FUSED_ADAM_DEVICES
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, fused=fused)
