"""Checks that run before anything is built: impossible values, missing hardware."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vae_lightning.errors import UserError
from vae_lightning.model.likelihoods import LIKELIHOODS
from vae_lightning.model.nets import NETS, net_settings
from vae_lightning.model.priors import PRIORS
from vae_lightning.model.vae import vae_settings_from_hparams
from vae_lightning.registry import UnknownPart
from vae_lightning.training.module import VAEModule, training_settings_from_hparams


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


_ABSENT = object()
# (key, check, what it must be: a string, or what makes it when a registry's names are needed); a
# key the config lacks is not checked
VALUE_CHECKS = (
    ("model.latent_dim", _positive_int, "an integer >= 1"),
    ("model.lr", _positive_number, "a number > 0"),
    ("model.input_dim", _positive_int, "an integer >= 1"),
    ("model.init_std", _positive_number, "a number > 0"),
    ("model.likelihood", lambda v: v in LIKELIHOODS, lambda: f"one of {', '.join(LIKELIHOODS.names())}"),
    ("model.prior", lambda v: v in PRIORS, lambda: f"one of {', '.join(PRIORS.names())}"),
    ("model.prior_components", _positive_int, "an integer >= 1 (mixture components or pseudo-inputs)"),
    ("model.k", _positive_int, "an integer >= 1 (importance samples per image)"),
    ("model.beta", lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v >= 0, "a number >= 0"),
    ("model.kl_warmup_epochs", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    ("data.batch_size", _positive_int, "an integer >= 1"),
    ("data.eval_batch_size", _positive_int, "an integer >= 1"),
    ("trainer.max_epochs", _positive_int, "an integer >= 1"),
    ("threads", lambda v: v is None or _positive_int(v), "an integer >= 1, or null (automatic)"),
    ("eval.k", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 skips the evaluation)"),
    ("eval.batch_size", _positive_int, "an integer >= 1 (test images per pass)"),
    ("eval.chunk_rows", _positive_int, "an integer >= 1"),
    # numpy's seeds: outside them Lightning's seed_everything raises a ValueError, a traceback
    ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
)


def _said(expected: str | Callable[[], str]) -> str:
    return expected() if callable(expected) else expected


def validate_config(cfg: DictConfig) -> None:
    """Refuse impossible values before any data is loaded or model built."""
    for key, ok, expected in VALUE_CHECKS:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not ok(value):
            raise UserError(f"{key}={value!r} is not valid: it must be {_said(expected)}")
    net = OmegaConf.select(cfg, "model.net", default=_ABSENT)
    if net is not _ABSENT and not isinstance(net, DictConfig):  # model.net=conv for model/net=conv
        choice = net if isinstance(net, str) and net in NETS else "<name>"
        raise UserError(f"model.net={net!r} is not valid: it is a block of settings; choose a net with "
                        f"model/net={choice} (the nets: {', '.join(NETS.names())})")  # fmt: skip
    if net is not _ABSENT:
        try:
            net_settings(OmegaConf.to_container(cfg.model.net))
        except ValueError as err:
            raise UserError(f"{err}; see conf/model/net/ for the nets and their settings") from None


def checkpoint_module(hparams: dict[str, Any], ckpt: Path) -> VAEModule:
    """The module a checkpoint's model settings describe. The settings are data: checked as the
    config's are, then by the module itself; a bad one is one line naming the file."""
    settings = {**vae_settings_from_hparams(hparams), **training_settings_from_hparams(hparams)}
    for key, ok, expected in VALUE_CHECKS:
        name = key.removeprefix("model.")
        if key.startswith("model.") and name in settings and not ok(settings[name]):
            if callable(expected):  # a registry's name: a part no installed package provides
                raise UserError(missing_part(ckpt, key, settings[name]))
            raise UserError(
                f"the model settings in {ckpt} are not valid: {key}={settings[name]!r} must be {expected}; "
                "pass another checkpoint"
            )
    try:
        return VAEModule.from_hparams(hparams)
    except UnknownPart as err:
        raise UserError(missing_part(ckpt, err.kind, err.name, err.group)) from None
    except (ValueError, TypeError, KeyError) as err:  # settings no net or objective of this project has
        raise UserError(f"the model settings in {ckpt} are not valid: {err}; pass another checkpoint") from None


def missing_part(ckpt: Path, kind: str, name: object, group: str | None = None) -> str:
    """One line for a checkpoint whose part no installed package provides."""
    kind = kind.removeprefix("model.")
    group = group or f"vae_lightning.{kind}s"
    return (f"{ckpt} was trained with the {kind} {name!r}, which no installed package provides: install the "
            f"plugin package that registers it (entry-point group {group}), then run this again")  # fmt: skip


# keys a "+key=value" override may add: arguments of the Lightning objects these build, which say
# themselves when one is wrong. Anywhere else a new key would be read by nothing.
OPEN_GROUPS = ("trainer", "callbacks", "logger", "model", "data", "eval")


def check_new_keys(overrides: list[str]) -> None:
    """Refuse ``+key=value`` overrides that add a key nothing reads (``+foo=1``)."""
    for override in overrides:
        if override.startswith("+") and not override.startswith("++"):
            key = override[1:].split("=", 1)[0]
            if key.split(".")[0].split("/")[0] not in OPEN_GROUPS:
                raise UserError(
                    f"{override}: {key} is not a setting of this project, so nothing would read it; check its spelling"
                )


def check_hardware(trainer_cfg: DictConfig) -> None:
    """Say plainly when the config asks for GPUs, or CPU processes, this machine does not have."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    devices = trainer_cfg.get("devices", "auto")
    cpu_only = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if cpu_only and isinstance(devices, int) and devices > (os.cpu_count() or 1):
        raise UserError(
            f"trainer.devices={devices} CPU processes but this machine has {os.cpu_count()} cores; "
            f"use trainer.devices={os.cpu_count()} or fewer"
        )
    if accelerator not in ("gpu", "cuda"):
        return
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wanted = devices if isinstance(devices, int) and devices > 0 else len(devices) if OmegaConf.is_list(devices) else 1
    if found == 0:
        raise UserError(
            f"trainer.accelerator={accelerator} but no CUDA GPU was found on this machine; "
            "use trainer.accelerator=auto (or trainer=cpu) to train on the CPU"
        )
    if wanted > found:
        raise UserError(f"trainer.devices={devices} but only {found} GPU(s) were found; use trainer.devices={found}")
