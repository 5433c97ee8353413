"""Progress a user can read wherever the output goes: Lightning's rich bar on a terminal, and one
line per epoch (its time, losses and the time left) when the output is a file or a scheduler's log,
where a bar redrawn in place is unreadable."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar


class EpochBar(RichProgressBar):
    """Lightning's rich bar, counting epochs from 1 as the run dir's files do ("Epoch 100/100")."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch + 1}"
        if self.trainer.max_epochs is not None:
            description += f"/{self.trainer.max_epochs}"
        return f"{description:{len(self.validation_description)}}"


class EpochLines(ProgressBar):
    """One line per finished epoch on stdout: ``epoch 3/100  8.4 s  train/loss 111.23 (rec 87.15,
    kl 24.08)  val/loss 110.91  about 13 min left``. A subclass of Lightning's ``ProgressBar``, so
    Lightning adds no bar of its own."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled, self._started, self._epoch_started, self._first_epoch = True, 0.0, 0.0, 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started, self._first_epoch = time.monotonic(), trainer.current_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        now, epoch, metrics = time.monotonic(), trainer.current_epoch + 1, trainer.callback_metrics
        parts = [f"epoch {epoch}/{trainer.max_epochs}", f"{now - self._epoch_started:.1f} s"]
        if "train/loss" in metrics:
            parts.append(f"train/loss {float(metrics['train/loss']):.2f} (rec {float(metrics['train/rec']):.2f}, "
                         f"kl {float(metrics['train/kl']):.2f})")  # fmt: skip
        if "val/loss" in metrics:
            parts.append(f"val/loss {float(metrics['val/loss']):.2f}")
        done = epoch - self._first_epoch
        if trainer.max_epochs and epoch < trainer.max_epochs and done > 0:
            parts.append(f"about {_duration((now - self._started) / done * (trainer.max_epochs - epoch))} left")
        print("  ".join(parts), flush=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"


def progress(refresh_rate: int = 20, **kwargs: Any) -> ProgressBar:
    """The rich bar when stdout is a terminal, else one line per epoch (``callbacks.progress_bar``)."""
    if sys.stdout.isatty():
        return EpochBar(refresh_rate=refresh_rate, **kwargs)
    return EpochLines()
