"""What ``ckpt_path`` continues, and where: a run is continued in its own dir, chosen before the
run starts; a stopped sweep continues job by job, each in its own dir."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from vae_lightning.checkpoints import find_checkpoint, load_checkpoint
from vae_lightning.errors import UserError
from vae_lightning.model import vae_settings_from_hparams
from vae_lightning.module import TRAINING_KEYS
from vae_lightning.nets import net_label, net_settings
from vae_lightning.outputs import CHOSEN_RUN_DIRS, named_by_user, read_json

# a checkpoint continued with other values would fail to load (sizes) or silently keep its own
# (the learning rate is part of Adam's restored state); fused_adam and init change nothing that is saved
CHECKED_TRAINING_KEYS = tuple(k for k in TRAINING_KEYS if k != "fused_adam")


@dataclass(frozen=True)
class Resume:
    checkpoint: Path | None = None  # what Trainer.fit continues from
    finished: dict | None = None  # a sweep job that had already finished: its metrics, kept


def run_to_continue(ckpt_path: str | None, log_dir: str | Path) -> Path | None:
    """The run dir that ``ckpt_path`` continues: ``last`` is the newest run with a last.ckpt, a run
    dir or a checkpoint inside one is that run; None for a checkpoint outside any run."""
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) == "last":
        runs_dir = Path(log_dir) / "train" / "runs"
        runs = sorted(runs_dir.glob("*/checkpoints/last.ckpt"))
        if not runs:
            raise UserError(f"ckpt_path=last but no run in {runs_dir} has checkpoints/last.ckpt")
        return runs[-1].parent.parent.resolve()
    ckpt = find_checkpoint(ckpt_path, "last")
    run_dir = ckpt.parent.parent
    return run_dir if ckpt.parent.name == "checkpoints" and (run_dir / ".hydra").is_dir() else None


def plan_resume(ckpt_path: str | None, output_dir: str | Path, max_epochs: int, sweep_job: bool) -> Resume:
    """``ckpt_path=last`` is this run's (or sweep job's) own last.ckpt; a file or run dir is that
    checkpoint. A sweep job that already ran ``max_epochs`` keeps its results."""
    if ckpt_path in (None, ""):
        return Resume()
    if str(ckpt_path) != "last":
        return Resume(find_checkpoint(ckpt_path, "last"))
    output_dir = Path(output_dir)
    last = output_dir / "checkpoints" / "last.ckpt"
    if sweep_job:
        metrics = read_json(output_dir / "metrics.json") or {}
        if "status" not in metrics and metrics.get("epochs", 0) >= max_epochs:
            return Resume(finished=metrics)
    if last.is_file():
        return Resume(last.resolve())
    if sweep_job:
        return Resume()  # this job had not finished an epoch: it starts
    raise UserError(f"ckpt_path=last but {output_dir} has no checkpoints/last.ckpt; pass ckpt_path=<file or run dir>")


def check_same_model(ckpt: Path, model_cfg: DictConfig) -> None:
    """Refuse to continue a checkpoint with other model settings, in one line."""
    saved = load_checkpoint(ckpt).get("hyper_parameters", {})
    saved_vae = vae_settings_from_hparams(saved)
    now = {"net": net_settings(model_cfg.net), "input_dim": model_cfg.input_dim, "latent_dim": model_cfg.latent_dim}
    now.update({key: model_cfg[key] for key in CHECKED_TRAINING_KEYS if key in model_cfg})
    was = {**{key: saved_vae.get(key) for key in ("net", "input_dim", "latent_dim")}, **saved}
    differ = [
        f"model.{key}={_shown(now[key])} (the checkpoint has {_shown(was[key])})"
        for key in now
        if key in was and was[key] != now[key]
    ]
    if differ:
        raise UserError(
            f"{ckpt} was trained with other settings: {', '.join(differ)}; continue it with the same "
            "model.* values, or start a new run without ckpt_path"
        )


def _shown(value: Any) -> str:
    return net_label(value) if isinstance(value, dict) and "name" in value else str(value)


def changed_data_settings(cfg: DictConfig, run_dir: Path) -> str:
    """``, with data.batch_size=64 (the run started with 128)`` for each data setting a continued
    run changes: recorded in its train.log (and its config in .hydra/continued_<time>/)."""
    first = run_dir / ".hydra" / "config.yaml"
    if not first.is_file():
        return ""
    started = OmegaConf.load(first).get("data", {})
    changed = [
        f"data.{key}={value} (the run started with {started[key]})"
        for key, value in cfg.data.items()
        if key in started and started[key] != value and key != "data_dir"
    ]
    return f", with {', '.join(changed)}" if changed else ""


class ContinueRun(Callback):
    """Registered in ``conf/hydra/default.yaml``; runs in the launching process before any run dir
    is made. A continued run writes into the run it continues (its checkpoints, tables and
    curves grow in place): the run ``ckpt_path`` lies in, or with ``ckpt_path=last`` the run
    ``hydra.run.dir`` names, else the newest. A continued sweep needs the
    sweep's dir; without one every job would start afresh in a new dir."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        ckpt_path = config.get("ckpt_path")
        try:
            if str(ckpt_path) == "last" and named_by_user(config, "hydra.run.dir"):  # the run named
                run_dir = Path(config.hydra.run.dir)
                if not (run_dir / "checkpoints" / "last.ckpt").is_file():
                    raise UserError(f"ckpt_path=last but {run_dir} has no checkpoints/last.ckpt; name another run")
            else:
                run_dir = run_to_continue(ckpt_path, config.paths.log_dir)
        except UserError as err:
            _stop(str(err))
        if run_dir is None:
            return
        with read_write(config.hydra):
            config.hydra.run.dir = str(run_dir)
            CHOSEN_RUN_DIRS.add(str(run_dir))
            if config.hydra.output_subdir is not None:  # (DDP children write none)
                # the run's own .hydra/ keeps the config it started with; each continuation's beside it
                config.hydra.output_subdir = f".hydra/continued_{time.strftime('%Y-%m-%d_%H-%M-%S')}"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if str(config.get("ckpt_path")) != "last" or named_by_user(config, "hydra.sweep.dir"):
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        earlier = sorted(d for d in sweep_dir.parent.glob("*") if d.is_dir() and d != sweep_dir)
        which = f"the newest is {earlier[-1]}" if earlier else f"there is none in {sweep_dir.parent}"
        _stop(
            "in a multirun, ckpt_path=last continues each job of an earlier sweep in its own dir; "
            f"add hydra.sweep.dir=<that sweep's dir> and its overrides ({which})"
        )


def _stop(reason: str) -> None:
    print(f"error: {reason}", file=sys.stderr)
    raise SystemExit(1)
