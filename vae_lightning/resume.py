"""What ``ckpt_path`` continues: a checkpoint file, a run dir, the newest run or, in a multirun,
each job's own dir, so that a stopped sweep picks up where it stopped."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vae_lightning.errors import UserError
from vae_lightning.outputs import read_json

# a checkpoint continued with other values would fail to load (sizes) or silently keep its own
# (the learning rate is part of Adam's restored state)
MODEL_KEYS = ("input_dim", "hidden_dim", "latent_dim", "lr")


@dataclass(frozen=True)
class Resume:
    checkpoint: Path | None = None  # what Trainer.fit continues from
    run_dir: Path | None = None  # the run dir it continues in, when it lies in one
    finished: dict | None = None  # a sweep job that had already finished: its metrics, kept


def plan_resume(
    ckpt_path: str | None, log_dir: str | Path, job_dir: Path | None = None, max_epochs: int | None = None
) -> Resume:
    """``ckpt_path``: a checkpoint file, a run dir (its last.ckpt), or ``last``: the newest run's
    last.ckpt or, for a multirun job (``job_dir``), that job's own."""
    if ckpt_path in (None, ""):
        return Resume()
    if str(ckpt_path) == "last":
        if job_dir is not None:
            return _sweep_job(job_dir, max_epochs)
        runs_dir = Path(log_dir) / "train" / "runs"
        runs = sorted(runs_dir.glob("*/checkpoints/last.ckpt"))
        if not runs:
            raise UserError(f"ckpt_path=last but no run in {runs_dir} has checkpoints/last.ckpt")
        ckpt = runs[-1]
    else:
        ckpt = Path(ckpt_path).expanduser()
        if ckpt.is_dir():
            ckpt = ckpt / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise UserError(f"checkpoint {ckpt} does not exist; pass ckpt_path=<file.ckpt>, a run dir, or last")
    ckpt = ckpt.resolve()
    if job_dir is not None:  # one checkpoint, many jobs: each writes in its own dir
        return Resume(ckpt)
    return Resume(ckpt, ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None)


def _sweep_job(job_dir: Path, max_epochs: int | None) -> Resume:
    metrics = read_json(job_dir / "metrics.json") or {}
    if "status" not in metrics and max_epochs is not None and metrics.get("epochs", 0) >= max_epochs:
        return Resume(finished=metrics)
    last = job_dir / "checkpoints" / "last.ckpt"
    return Resume(last.resolve(), job_dir.resolve()) if last.is_file() else Resume()


def check_same_model(ckpt: Path, model_cfg: DictConfig) -> None:
    """Refuse to continue a checkpoint with other model settings, in one line."""
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True).get("hyper_parameters", {})
    except Exception as err:  # torch's reasons run to several lines: the first says what is wrong
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise UserError(f"cannot read checkpoint {ckpt}: {reason}; pass another ckpt_path") from None
    differ = [
        f"model.{key}={model_cfg[key]} (the checkpoint has {saved[key]})"
        for key in MODEL_KEYS
        if key in saved and key in model_cfg and saved[key] != model_cfg[key]
    ]
    if differ:
        raise UserError(
            f"{ckpt} was trained with other settings: {', '.join(differ)}; continue it with the same "
            "model.* values, or start a new run without ckpt_path"
        )


class ContinueSweep(Callback):
    """``-m ... ckpt_path=last`` continues the jobs of an earlier sweep, so it needs that sweep's
    dir; without one every job would start afresh in a new dir. Registered in
    ``conf/hydra/default.yaml``; runs in the launching process, before any job."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if str(config.get("ckpt_path")) != "last":
            return
        if any(o.startswith("hydra.sweep.dir=") for o in config.hydra.overrides.hydra):
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        earlier = sorted(d for d in sweep_dir.parent.glob("*") if d.is_dir() and d != sweep_dir)
        which = f"the newest is {earlier[-1]}" if earlier else f"there is none in {sweep_dir.parent}"
        print(
            "error: in a multirun, ckpt_path=last continues each job of an earlier sweep in its own dir; "
            f"add hydra.sweep.dir=<that sweep's dir> and its overrides ({which})",
            file=sys.stderr,
        )
        raise SystemExit(1)
