"""Sharing the CPU with whatever else runs: a run's math uses every core it may use, until other
work competes for them, then gives way, and takes them back when that work ends.

Measured here (docs/performance.md): two default runs side by side, each with a thread per core,
took 3.5x as long as the same two one after the other, because torch's OpenMP threads spin while
they wait; with a thread each they took 0.6x. No thread count set once at the start is right for
both a run alone and runs side by side, so it is checked while the run goes on.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from vae_lightning.launch import usable_cores


def competing_threads(samples: int = 3) -> int | None:
    """Threads of other processes that are running or waiting for a core now: the kernel's count of
    runnable threads (``/proc/loadavg``) less this process's own, the median of a few looks; None
    where /proc does not tell (not Linux)."""
    counts = []
    try:
        for _ in range(samples):
            runnable = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
            own = 0
            for task in Path("/proc/self/task").iterdir():
                try:
                    own += (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
                except (OSError, IndexError):
                    pass  # a thread that ended meanwhile
            counts.append(max(0, runnable - own))
            time.sleep(0.0005)
    except (OSError, ValueError, IndexError):
        return None
    return int(statistics.median(counts))


class ShareCores(L.Callback):
    """Every ``every_seconds`` of training (and between the evaluation's batches, which call
    ``adjust``), look at the other work on the machine; when two looks in a row agree, set torch's
    threads to the usable cores less what that work uses, at least one. (One look can catch a
    passing process; each look costs ~2 ms.) Off when ``threads`` or ``OMP_NUM_THREADS`` sets the
    count: a run uses what it is given."""

    def __init__(self, threads: int | None = None, every_seconds: float = 2.0) -> None:
        self.active = threads is None and not os.environ.get("OMP_NUM_THREADS") and competing_threads(1) is not None
        self.every_seconds, self.cores = every_seconds, usable_cores()
        self._last_look, self._last_wanted, self._given = 0.0, None, None

    def adjust(self) -> None:
        if not self.active or time.monotonic() - self._last_look < self.every_seconds:
            return
        self._last_look = time.monotonic()
        others = competing_threads()
        if others is None:
            return
        wanted = max(1, self.cores - others)
        if wanted == self._last_wanted and wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
        self._last_wanted = wanted

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._given is None:
            self._given = torch.get_num_threads()
        self.adjust()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the process goes on after this stage (the test pass, or a caller's own work): it gets
        # back the threads it had
        if self.active and self._given is not None:
            torch.set_num_threads(self._given)
            self._last_wanted = None

    on_test_end = on_validation_end = on_train_end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.adjust()

    on_test_start = on_validation_start = on_train_start


def share_cores(trainer: L.Trainer) -> None:
    """Let the trainer's ``ShareCores`` (if any) look again: for long hooks, between their batches."""
    for callback in trainer.callbacks:
        if isinstance(callback, ShareCores):
            callback.adjust()
