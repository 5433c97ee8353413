"""Callbacks that write the run's records: per-step and per-epoch metrics, loss curves, samples."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torchvision.utils import save_image

from vae_lightning.errors import DivergenceError
from vae_lightning.figures.plots import loss_curves, sample_grid, upscale
from vae_lightning.names import EPOCH_COLUMNS, STEP_ORDER, current_name, epoch_metrics, step_metric
from vae_lightning.outputs import replaced_atomically
from vae_lightning.training import stopping
from vae_lightning.training.checkpoints import saved_progress


class TrainingHistory(L.Callback):
    """The record of a run: every optimizer step's per-image value of each of the objective's terms
    (rec = -log p(x|z), KL, loss, and any of its own), and every epoch's train and val metrics.

    Step values stay on the device and are sent to the loggers (TensorBoard) in blocks of
    ``flush_every`` steps with their true step numbers: one host sync per block instead of a
    per-step ``self.log``, which costs more than the step's own compute on a CPU.
    Writes ``epochs.csv`` after each epoch and ``loss_curves.png`` when training ends or stops
    on an error. The history is part of the checkpoint, so a resumed run's files cover the
    whole run.
    """

    def __init__(
        self,
        output_dir: str,
        flush_every: int = 100,
        csv_name: str = "epochs.csv",
        plot_name: str = "loss_curves.png",
    ) -> None:
        self.csv_path = Path(output_dir) / csv_name
        self.plot_path = Path(output_dir) / plot_name
        self.flush_every = flush_every
        self.epochs: list[dict[str, float]] = []
        self.steps = torch.empty(0, dtype=torch.long)  # logger step of each value (0-based)
        self.step_terms: tuple[str, ...] = STEP_ORDER  # the objective's terms, rec, kl and loss first
        self.epoch_columns: tuple[str, ...] = EPOCH_COLUMNS
        self.step_values = torch.empty(0, len(self.step_terms))  # (steps, step_terms) per image, on the CPU
        self._pending: list[torch.Tensor] = []  # not yet flushed, still on the device
        self._pending_steps: list[int] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        terms = pl_module.objective.terms
        self.step_terms = (*STEP_ORDER, *(term for term in terms if term not in STEP_ORDER))
        self.epoch_columns = ("epoch", *epoch_metrics(terms))
        if not len(self.step_values):
            self.step_values = torch.empty(0, len(self.step_terms))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._pending.append(torch.stack([outputs["terms"][term] for term in self.step_terms]))
        self._pending_steps.append(trainer.global_step - 1)  # as Lightning numbers on_step logs
        if len(self._pending) >= self.flush_every:
            self._flush_steps(trainer)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # validation may end with the checkpoint saves: check this epoch's steps before them
        if not trainer.sanity_checking:
            self._flush_steps(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check_epoch(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush_steps(trainer)
        self._check_epoch(trainer, pl_module)
        metrics = trainer.callback_metrics
        row: dict[str, float] = {"epoch": trainer.current_epoch + 1}
        for key in self.epoch_columns[1:]:
            if key in metrics:
                row[key] = float(metrics[key])
        self.record_epoch(row)
        if trainer.is_global_zero:
            self.write_csv()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.write_plot()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # keep what was recorded, but never let that hide the error that stopped the run
        try:
            self._flush_steps(None)
            if trainer.is_global_zero and len(self.step_values):
                self.write_plot()
        except Exception as err:
            print(f"warning: could not write {self.plot_path.name}: {err}", file=sys.stderr)
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            # Lightning exits after this hook: say what a Ctrl-C kept
            print(f"Interrupted: {saved_progress(self.csv_path.parent)}", file=sys.stderr)

    def _flush_steps(self, trainer: L.Trainer | None = None) -> None:
        if not self._pending:
            return
        values = torch.stack(self._pending).float().cpu()  # the block's one host sync
        steps = torch.tensor(self._pending_steps, dtype=torch.long)
        self._pending, self._pending_steps = [], []
        self.record_steps(values, steps, trainer.loggers if trainer else [])
        if trainer is None:
            return
        divergence = self.divergence(values, steps, trainer.current_epoch)
        # every rank flushes at the same steps: all of them stop if any one diverged, rather than
        # the others waiting for it in the next all-reduce until a timeout
        if trainer.strategy.reduce_boolean_decision(divergence is not None, all=False):
            if divergence is None:
                raise _diverged(trainer, f"the loss of another process became infinite or NaN by step {steps[-1] + 1}")
            raise _diverged(trainer, divergence)

    def record_steps(self, values: torch.Tensor, steps: torch.Tensor, loggers: list) -> None:
        """Keep a block of steps' values (steps, step_terms), on the CPU, and send them to ``loggers``."""
        self.step_values = torch.cat([self.step_values, values])
        self.steps = torch.cat([self.steps, steps])
        for logger in loggers:
            for step, row in zip(steps.tolist(), values.tolist(), strict=True):
                logger.log_metrics(
                    {step_metric(term): value for term, value in zip(self.step_terms, row, strict=True)}, step
                )

    def record_epoch(self, row: dict[str, float]) -> None:
        """Keep an epoch's row (``epoch`` counted from 1), replacing any of that epoch or later
        (a continuation from an earlier checkpoint trains them again)."""
        self.epochs = [e for e in self.epochs if e["epoch"] < row["epoch"]] + [row]

    @staticmethod
    def divergence(values: torch.Tensor, steps: torch.Tensor, epoch: int) -> str | None:
        """What became infinite or NaN in a block of steps' values (0-based ``epoch``), or None."""
        bad = (~torch.isfinite(values).all(dim=1)).nonzero()
        if not len(bad):
            return None
        step, (rec, kl, loss) = int(steps[bad[0, 0]]), values[bad[0, 0], :3].tolist()  # STEP_ORDER
        where = f"at step {step + 1} of epoch {epoch + 1}"
        return f"the per-image loss became {loss:.4g} (rec {rec:.4g}, KL {kl:.4g}) {where}"

    def _check_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A loss can stay finite while the weights overflow: check those and val/loss too,
        before this epoch's checkpoints are written (Lightning saves after these hooks)."""
        val_loss = trainer.callback_metrics.get("val/loss")
        what = self.epoch_divergence(val_loss, pl_module.parameters(), trainer.current_epoch)
        if what is not None:
            raise _diverged(trainer, what)

    @staticmethod
    def epoch_divergence(val_loss: Any, parameters: Any, epoch: int) -> str | None:
        """What became infinite or NaN by the end of (0-based) ``epoch``: val/loss or the weights; or None."""
        if val_loss is not None and not torch.isfinite(torch.as_tensor(val_loss)):
            return f"val/loss became {float(val_loss):.4g} after epoch {epoch + 1}"
        if not all(torch.isfinite(p).all() for p in parameters):
            return f"the weights became infinite or NaN in epoch {epoch + 1}"
        return None

    def write_csv(self) -> None:
        with replaced_atomically(self.csv_path) as partial, partial.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.epoch_columns)
            writer.writeheader()
            for row in self.epochs:
                writer.writerow({k: (f"{v:.6f}" if k != "epoch" else int(v)) for k, v in row.items()})

    def write_plot(self) -> None:
        fig = loss_curves(self.step_values[:, 0].tolist(), self.step_values[:, 1].tolist(), self.epochs)
        with replaced_atomically(self.plot_path) as partial:
            fig.savefig(partial, dpi=110, format="png")

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "steps": self.steps.clone(), "step_values": self.step_values.clone(),
                "step_terms": list(self.step_terms)}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = [{current_name(k): v for k, v in row.items()} for row in state_dict["epochs"]]
        self.steps = state_dict["steps"]
        values = state_dict["step_values"]
        if values.shape[1] == 2:  # written before the loss had its own column: it was rec + kl
            values = torch.cat([values, values.sum(1, keepdim=True)], 1)
        self.step_values = values
        self.step_terms = tuple(state_dict.get("step_terms", STEP_ORDER))  # older checkpoints: rec, kl, loss


def last_epoch_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The train and val metrics of the run's last finished epoch, from its history (restored from
    the checkpoint): a continuation that had no epoch left to train (stopped in its test pass) has
    none in ``trainer.callback_metrics``."""
    history = next((cb for cb in trainer.callbacks if isinstance(cb, TrainingHistory)), None)
    if history is None or not history.epochs:
        return {}
    return {key: value for key, value in history.epochs[-1].items() if key != "epoch"}


def training_seconds(trainer: L.Trainer) -> float:
    """The training's time over every sitting of the run, by Lightning's Timer (its state rides in
    the checkpoints, so a continuation adds to it; ``building.build_run`` sees that there is one)."""
    timer = next(cb for cb in trainer.callbacks if isinstance(cb, Timer))
    return round(timer.time_elapsed("train"), 1)


def _diverged(trainer: L.Trainer, what: str) -> DivergenceError:
    lr = trainer.lightning_module.hparams.get("lr", "?") if trainer.lightning_module else "?"
    return diverged(what, lr, trainer.current_epoch)  # finished epochs, each with its checkpoint


def diverged(what: str, lr: Any, finished_epochs: int) -> DivergenceError:
    """The one line a diverged run ends with: what, the checkpoint kept, and what to try."""
    done = finished_epochs
    kept = f"checkpoints/last.ckpt keeps epoch {done}" if done else "no epoch had finished, so there is no checkpoint"
    return DivergenceError(f"training diverged: {what}; {kept}; try a smaller model.lr (now {lr})")


class SampleGrid(L.Callback):
    """Decodes ``n`` draws of z ~ N(0, I) from a fixed seed: after every epoch to TensorBoard (at
    1:1; its image slider then shows the digits forming), and when training ends as one row of
    digits in ``samples.png`` (each pixel drawn as ``scale`` x ``scale``, so the 28 x 28 digits are
    visible at a glance)."""

    def __init__(
        self,
        output_dir: str,
        n: int = 10,
        nrow: int = 10,
        seed: int = 2024,
        scale: int = 4,
        filename: str = "samples.png",
    ) -> None:
        self.path = Path(output_dir) / filename
        self.n, self.nrow, self.seed, self.scale = n, nrow, seed, scale

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.log_epoch(trainer.loggers, pl_module.model, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.write(pl_module.model)

    def log_epoch(self, loggers: list, model: torch.nn.Module, step: int) -> None:
        """The grid at 1:1, to the TensorBoard among ``loggers``, at ``step``."""
        tensorboards = [lg for lg in loggers if isinstance(lg, TensorBoardLogger)]
        if tensorboards:
            grid = sample_grid(model, self.n, self.nrow, self.seed)  # its own generator
            for tb in tensorboards:
                tb.experiment.add_image(self.path.stem, grid, step)

    def write(self, model: torch.nn.Module) -> None:
        grid = sample_grid(model, self.n, self.nrow, self.seed)
        with replaced_atomically(self.path) as partial:
            save_image(upscale(grid, self.scale), partial, format="png")


class StopOnSignal(L.Callback):
    """A stop signal (``stopping``: SIGTERM, and submitit's time-limit signal in a Slurm job) stops
    every process of the run together, with the ``SIGTERMException`` Lightning itself uses.

    The handler only sets a flag; the processes agree on it every ``check_every`` training steps
    (every step on one process) and after every eval batch."""

    def __init__(self, check_every: int = 20) -> None:
        self.check_every = check_every
        self.requested = False  # by this process's signal, or another process's

    def _install(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stopping.listen()  # again: Lightning registers its handler when a stage starts, before these hooks

    on_train_start = on_test_start = _install

    def _check(self, trainer: L.Trainer) -> None:
        asked = self.requested or stopping.stop_signal() is not None
        if trainer.strategy.reduce_boolean_decision(asked, all=False):
            self.requested = True
            raise SIGTERMException

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.world_size == 1 or trainer.global_step % self.check_every == 0:
            self._check(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._check(trainer)

    on_test_batch_end = on_validation_batch_end


def stop_requested(trainer: L.Trainer) -> bool:
    """Whether this process was asked to stop, by Lightning's handler or by a stop signal."""
    asked = any(isinstance(cb, StopOnSignal) and cb.requested for cb in trainer.callbacks)
    return trainer.received_sigterm or asked or stopping.stop_signal() is not None
