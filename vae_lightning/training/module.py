"""The LightningModule: the training step of each objective, per-image logging, Adam."""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from vae_lightning.model.objectives import OBJECTIVES, Objective, Progress
from vae_lightning.model.vae import VAE, vae_settings_from_hparams
from vae_lightning.names import STAGES, metric

FUSED_ADAM_DEVICES = ("cpu", "cuda", "mps", "xpu")
# the test pass draws its z from its own generator with this seed: the same weights get the same
# test loss in every run and in ``vae_lightning.eval``
TEST_NOISE_SEED = 0
# what checkpoints written before objectives were parts (main c1154ae and earlier) were trained with
# when they do not say: the module's defaults of that time, written down once
OLD_CHECKPOINT_TRAINING = {"lr": 1e-3, "fused_adam": None, "objective": "elbo", "beta": 1.0, "kl_warmup_epochs": 0,
                           "k": 1}  # fmt: skip
# the module's own settings besides its objective's (the VAE's are ``VAE.settings``); a checkpoint keeps all
TRAINING_KEYS = ("lr", "fused_adam", "objective")


def saved_generator_states(saved: Any) -> list[dict]:
    """Each process's generator states in a checkpoint's ``rng_states`` ({"torch": ..., and "cuda"
    on a GPU}), as ``VAEModule.on_save_checkpoint`` keeps them (older checkpoints: one dict)."""
    return saved if isinstance(saved, list) else [saved] if saved else []


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


def training_settings_from_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's training settings (its objective's included); what it lacks, it was trained
    with as of the checkpoints before objectives were parts (``OLD_CHECKPOINT_TRAINING``), not with
    today's defaults."""
    vae_keys = {"vae", "input_dim", "hidden_dim", "latent_dim", "init", "init_std"}
    kept = {k: v for k, v in hparams.items() if k not in vae_keys}
    settings = {**OLD_CHECKPOINT_TRAINING, **kept}
    # an objective reads its own settings; the others old checkpoints carry were at their neutral values
    reads = OBJECTIVES.get(settings["objective"]).reads if settings["objective"] in OBJECTIVES else ()
    old_shared = set(OLD_CHECKPOINT_TRAINING) - set(TRAINING_KEYS)
    return {k: v for k, v in settings.items() if k in TRAINING_KEYS or k in reads or k not in old_shared}


class VAEModule(L.LightningModule):
    """Optimises the objective (``model.objective``, by default the reference notebook's BCE + KL)
    and logs each of its terms per image (``objectives``: loss, rec and KL for every objective, so
    runs with different objectives sit side by side, and any terms of its own).

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
        **objective_settings: Any,
    ) -> None:
        super().__init__()
        self.objective: Objective = OBJECTIVES.get(objective)(**objective_settings)
        if vae is None:  # the reference notebook's
            vae = VAE()
        elif isinstance(vae, dict):  # its settings, as Lightning's load_from_checkpoint passes them back
            vae = VAE(**vae)
        self.save_hyperparameters(ignore=["vae"])
        self.hparams.update(self.objective.settings)  # plain data, each read by the objective
        self.hparams["vae"] = vae.settings  # plain data: a checkpoint rebuilds its model from it, by name
        self.model = vae
        terms = self.objective.terms
        self.means = nn.ModuleDict({f"{stage}_{term}": PerImageMean() for stage in STAGES for term in terms})
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
        return cls(VAE(**vae_settings_from_hparams(hparams)), **training_settings_from_hparams(hparams))

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
        saved = saved_generator_states(getattr(self, "_rng_to_restore", None))
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

    def progress(self) -> Progress:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return Progress()
        steps = trainer.num_training_batches
        return Progress(self.global_step, steps if isinstance(steps, int) and steps > 0 else 1)  # (inf before fit)

    def _shared_step(
        self, x: Tensor, stage: str, noise: torch.Generator | None = None, progress: Progress | None = None
    ) -> dict[str, Tensor]:
        graph_loss, terms = self.objective.loss_and_terms(self.model, x, noise, progress or self.progress())
        for term in self.objective.terms:
            mean = self.means[f"{stage}_{term}"]
            mean.update(terms[term].detach())
            if (stage, term) not in self._logged_this_epoch:
                # Lightning keeps a reference and computes (under DDP, syncs) the metric when
                # the epoch ends, before any epoch-end hook, then resets it. Logging it once per
                # epoch is enough; every step would move the metric to the device each time
                # (docs/performance.md).
                self.log(metric(stage, term), mean, on_step=False, on_epoch=True, prog_bar=term == "loss")
                self._logged_this_epoch.add((stage, term))
        return {"graph_loss": graph_loss, **{t: terms[t].detach().mean() for t in self.objective.terms}}

    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        progress = self.progress()
        out = self._shared_step(batch, "train", progress=progress)
        for name, value in self.objective.step_logs(progress).items():  # a schedule, in TensorBoard
            self.log(name, value, on_step=True, on_epoch=False)
        # Lightning backpropagates "loss": the sum over the batch, not the mean. The step's
        # per-image values of the objective's terms go out with it, still on the device;
        # TrainingHistory logs them in blocks (a self.log per step costs more than the step itself
        # on a CPU).
        return {"loss": out.pop("graph_loss"), "terms": out}

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._shared_step(batch, "test", self._test_noise)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        fused = self.hparams.fused_adam
        if fused is None:
            fused = self.device.type in FUSED_ADAM_DEVICES
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, fused=fused)
