"""What ``ckpt_path`` continues, and where: a run is continued in its own dir, chosen before the
run starts (``rundir``); a stopped sweep continues job by job, each in its own dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vae_lightning.errors import UserError
from vae_lightning.model.nets import net_label, net_settings
from vae_lightning.model.vae import vae_settings_from_hparams
from vae_lightning.outputs import read_json
from vae_lightning.runs.checks import checkpoint_module
from vae_lightning.runs.results import run_finished
from vae_lightning.training.checkpoints import find_checkpoint
from vae_lightning.training.module import training_settings_from_hparams

# a checkpoint continued with other values would fail to load (sizes) or silently keep its own
# (the learning rate is part of Adam's restored state); fused_adam and init change nothing that is saved


@dataclass(frozen=True)
class Continuation:
    run_dir: Path | None  # the run it continues, in place; None: a checkpoint outside any run
    checkpoint: Path


@dataclass(frozen=True)
class Resume:
    checkpoint: Path | None = None  # what Trainer.fit continues from
    finished: dict | None = None  # a sweep job that had already finished: its metrics, kept


def resolve(ckpt_path: str | None, log_dir: str | Path, run_dir: str | Path | None = None) -> Continuation | None:
    """The one place ``ckpt_path`` becomes (run dir, checkpoint file): ``last`` is ``run_dir``'s
    last.ckpt when a run dir is named, else the newest run's under ``log_dir``; a run dir or a
    checkpoint inside one is that run; a checkpoint elsewhere continues in a new run (run_dir None)."""
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) == "last":
        if run_dir is not None:
            last = Path(run_dir) / "checkpoints" / "last.ckpt"
            if not last.is_file():
                raise UserError(f"ckpt_path=last but {run_dir} has no checkpoints/last.ckpt; name another run")
            return Continuation(Path(run_dir).resolve(), last.resolve())
        runs_dir = Path(log_dir) / "train" / "runs"
        runs = sorted(runs_dir.glob("*/checkpoints/last.ckpt"))
        if not runs:
            raise UserError(f"ckpt_path=last but no run in {runs_dir} has checkpoints/last.ckpt")
        return Continuation(runs[-1].parent.parent.resolve(), runs[-1].resolve())
    ckpt = find_checkpoint(ckpt_path, "last")
    in_run = ckpt.parent.name == "checkpoints" and (ckpt.parent.parent / ".hydra").is_dir()
    return Continuation(ckpt.parent.parent if in_run else None, ckpt)


def plan_resume(ckpt_path: str | None, output_dir: str | Path, max_epochs: int, sweep_job: bool) -> Resume:
    """What this run (or sweep job) continues. A run's ``ckpt_path`` was resolved before it started
    (``rundir.RunDir``); a sweep job's ``last`` is its own dir's, and a job that already ran
    ``max_epochs`` keeps its results."""
    if sweep_job and str(ckpt_path) == "last":
        metrics = read_json(Path(output_dir) / "metrics.json") or {}
        if run_finished(metrics) and metrics.get("epochs", 0) >= max_epochs:
            return Resume(finished=metrics)
        if not (Path(output_dir) / "checkpoints" / "last.ckpt").is_file():
            return Resume()  # this job had not finished an epoch: it starts
    continuation = resolve(ckpt_path, "", output_dir if str(ckpt_path) == "last" else None)
    return Resume(continuation.checkpoint if continuation else None)


def check_epochs_left(ckpt: Path, checkpoint: dict, max_epochs: int | None) -> None:
    """A continuation asks for at least the epochs its checkpoint has trained (Lightning's own
    refusal is a traceback)."""
    epoch = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
    if isinstance(epoch, int) and max_epochs not in (None, -1) and epoch > max_epochs:
        raise UserError(
            f"{ckpt} has trained {epoch + 1} epochs, more than trainer.max_epochs={max_epochs}; continue it "
            f"with trainer.max_epochs={epoch + 1} or more"
        )


def keep_run_model(ckpt: Path, checkpoint: dict, model_cfg: DictConfig, named: set[str]) -> list[str]:
    """A continued run keeps the model settings it was trained with: each one today's config would
    change is set back to the checkpoint's, unless the user named it (``model=...``,
    ``model.<key>=...``, ``model/net=...``, an experiment); a named one that differs is refused in one
    line. Returns the settings kept, as ``model.<key>=<value>``."""
    saved = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict) or not ({"vae", "latent_dim"} & set(saved)) or "state_dict" not in checkpoint:
        raise UserError(
            f"{ckpt} is not a vae_lightning training checkpoint (no VAE settings), so there is nothing to "
            "continue; pass a run dir or a checkpoint written by vae_lightning.train"
        )
    # a checkpoint's settings are data: only values the module accepts are taken into the config
    with torch.random.fork_rng(devices=[]):  # the run's random numbers are not drawn from here
        checkpoint_module(saved, ckpt)
    saved_vae = vae_settings_from_hparams(saved)
    shape = ("input_dim", "latent_dim", "likelihood", "prior", "prior_components")
    now = {"net": net_settings(model_cfg.net), **{key: model_cfg[key] for key in shape if key in model_cfg}}
    # the training settings, its objective's included (fused Adam changes no number)
    training = {k: v for k, v in training_settings_from_hparams(saved).items() if k != "fused_adam" and _plain(v)}
    now.update({key: model_cfg[key] for key in training if key in model_cfg})
    was = {**saved_vae, **training}
    if was.get("prior") == "normal":  # the number of components means nothing without them
        now.pop("prior_components", None)
    differ = [key for key in now if key in was and was[key] != now[key]]
    if refused := [key for key in differ if _named(key, named)]:
        shown = ", ".join(f"model.{key}={_shown(now[key])} (the checkpoint has {_shown(was[key])})" for key in refused)
        raise UserError(
            f"{ckpt} was trained with other settings: {shown}; continue it with the same "
            "model.* values, or start a new run without ckpt_path"
        )
    for key in differ:
        model_cfg[key] = was[key]
    return [f"model.{key}={_shown(was[key])}" for key in differ]


def _named(key: str, named: set[str]) -> bool:
    """Whether the user's overrides set model setting ``key``."""
    if {"model", "experiment"} & named:
        return True
    return any(n in (f"model.{key}", f"model/{key}") or n.startswith(f"model.{key}.") for n in named)


def _plain(value: Any) -> bool:
    """A number or a short name: what a training setting is (never a string OmegaConf would resolve)."""
    if isinstance(value, str):
        return value.isidentifier()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    return net_label(value) if isinstance(value, dict) and "name" in value else str(value)


def changed_data_settings(cfg: DictConfig, run_dir: Path) -> str:
    """``, with data.batch_size=64 (the run started with 128)`` for each data setting a continued
    run changes: recorded in its train.log (and its config in .hydra/continued_<time>/)."""
    first = run_dir / ".hydra" / "config.yaml"
    if not first.is_file():
        return ""
    # read as data, unresolved: a run dir is a file a user hands over, and its strings are not config
    started = OmegaConf.to_container(OmegaConf.load(first), resolve=False).get("data") or {}
    now = OmegaConf.to_container(cfg.data, resolve=False)
    changed = [
        f"data.{key}={value} (the run started with {started[key]})"
        for key, value in now.items()
        if key in started and started[key] != value and key != "data_dir"
    ]
    return f", with {', '.join(changed)}" if changed else ""
