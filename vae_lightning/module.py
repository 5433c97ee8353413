"""The LightningModule: the reference notebook's training step, per-image logging, Adam."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vae_lightning.model import VAE, elbo_terms
from vae_lightning.names import STAGES, TERMS, metric

FUSED_ADAM_DEVICES = ("cpu", "cuda", "mps", "xpu")
# the test pass draws its z from its own generator with this seed: the same weights get the same
# test loss in every run and in ``vae_lightning.eval``
TEST_NOISE_SEED = 0


class VAEModule(L.LightningModule):
    """Optimises the summed BCE + KL (the reference notebook's loss) and logs it per image.

    ``train/bce_step`` etc. are the batch's per-image values at every step (returned by
    ``training_step``, logged by ``callbacks.TrainingHistory``); ``train/bce`` etc.
    are the epoch's sum over images divided by images seen (the numbers the reference notebook prints),
    aggregated by ``MeanMetric`` over every image's value, so that they mean the same for
    any batch size and on any number of devices.
    """

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dim: int = 400,
        latent_dim: int = 20,
        lr: float = 1e-3,
        init: str = "default",
        init_std: float = 0.01,
        fused_adam: bool | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = VAE(input_dim, hidden_dim, latent_dim, init, init_std)
        # NaN checks inside the metric would sync with the host every step. ("disable" also
        # drops MeanMetric's weights, torchmetrics#3434, so we feed per-image values instead.)
        self.means = nn.ModuleDict(
            {f"{stage}_{term}": MeanMetric(nan_strategy="disable") for stage in STAGES for term in TERMS}
        )
        self._logged_this_epoch: set[tuple[str, str]] = set()

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
        saved = getattr(self, "_rng_to_restore", None)
        if saved:
            # this process's own; with another number of processes the noise cannot match anyway
            states = saved[self.global_rank % len(saved)] if isinstance(saved, list) else saved
            torch.set_rng_state(states["torch"])
            cuda = states.get("cuda")
            if self.device.type == "cuda" and isinstance(cuda, torch.Tensor):  # (lists: an older format)
                torch.cuda.set_rng_state(cuda, self.device)
            self._rng_to_restore = None

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

    def _shared_step(self, x: Tensor, stage: str, noise: torch.Generator | None = None) -> dict[str, Tensor]:
        bce, kl = elbo_terms(self.model, x, noise)
        terms = {"bce": bce.detach(), "kl": kl.detach()}
        terms["loss"] = terms["bce"] + terms["kl"]
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
        # the reference notebook's loss: summed over pixels and over the batch (not a mean)
        return {"graph_loss": bce.sum() + kl.sum(), **{t: v.mean() for t, v in terms.items()}}

    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        out = self._shared_step(batch, "train")
        # Lightning backpropagates "loss": the reference notebook's sum over the batch, not the mean. The
        # step's per-image BCE and KL go out with it, still on the device; TrainingHistory
        # logs them in blocks (a self.log per step costs more than the step itself on a CPU).
        return {"loss": out["graph_loss"], "bce": out["bce"], "kl": out["kl"]}

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._shared_step(batch, "test", self._test_noise)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        fused = self.hparams.fused_adam
        if fused is None:
            fused = self.device.type in FUSED_ADAM_DEVICES
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, fused=fused)
