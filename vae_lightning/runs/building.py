"""What the entry points share: building a run's parts from the config, and the trained module
(with the protocol it was trained on) from a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Timer
from omegaconf import DictConfig

from vae_lightning.data.datamodule import BINARIZE, MNISTDataModule
from vae_lightning.data.datasets import SOURCES
from vae_lightning.errors import UserError
from vae_lightning.launch import threads_for_this_run
from vae_lightning.runs.checks import check_hardware, checkpoint_module, validate_config
from vae_lightning.tracking.mlflow_logger import mlflow_loggers
from vae_lightning.training.checkpoints import check_finite, load_checkpoint
from vae_lightning.training.module import VAEModule
from vae_lightning.workarounds import datamodule_state, skip_nvml_probe_without_gpu, without_lightning_requeue


def build(node: DictConfig, what: str, **kwargs):
    """Instantiate one config node; a bad value ends in one line naming the group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, UserError):
            raise cause from None
        message = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise UserError(f"cannot build the {what} from the config: {message}; check the {what}.* overrides") from err


def build_run(cfg: DictConfig, extra_callbacks: list | None = None) -> tuple:
    """Check the config, seed everything and build (datamodule, module, trainer)."""
    validate_config(cfg)
    check_hardware(cfg.trainer)
    skip_nvml_probe_without_gpu()
    if (threads := threads_for_this_run(cfg.get("threads"))) is not None:
        torch.set_num_threads(threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build(cfg.data, "data")
    if "LOCAL_RANK" not in os.environ:  # the launching process: missing or corrupt data is said first
        datamodule.prepare_data()
    module = build(cfg.model, "model")
    callbacks = [build(node, "callbacks") for node in cfg.get("callbacks", {}).values()]
    if cfg.get("test") and cfg.eval.k > 0:
        callbacks.append(build(cfg.eval, "eval"))
    loggers = [build(node, "logger") for node in cfg.get("logger", {}).values()]
    for tracker in mlflow_loggers(loggers):  # its store answers, or one line, before training
        tracker.open(cfg)
    callbacks += extra_callbacks or []
    # the training's time, carried over continuations (given trainer.max_time, Lightning adds a Timer
    # of its own, and would ignore max_time were one here already)
    if cfg.trainer.get("max_time") is None:
        callbacks.append(Timer(verbose=False))
    trainer_cfg = without_lightning_requeue(cfg.trainer)
    trainer: L.Trainer = build(trainer_cfg, "trainer", callbacks=callbacks, logger=loggers or False)
    return datamodule, module, trainer


# what the weights were trained on: a continued run keeps it, an evaluation uses it
PROTOCOL_KEYS = ("dataset", "binarize", "binarize_seed", "val_split")


def load_trained(ckpt: Path) -> tuple[VAEModule, dict[str, Any]]:
    """The module in a vae_lightning checkpoint or the reference notebook's own ``state_dict``
    (same layer names), and the data protocol it was trained on, from one read of the file. A
    checkpoint without a protocol (the reference notebook's, or from before protocols existed)
    was trained on continuous MNIST."""
    state = load_checkpoint(ckpt)
    if not isinstance(state, dict):
        raise UserError(f"{ckpt} holds a {type(state).__name__}, not a checkpoint; pass a vae_lightning checkpoint")
    if "state_dict" in state:
        hparams, weights = state.get("hyper_parameters"), state["state_dict"]
        if not isinstance(hparams, dict) or not isinstance(weights, dict) or not {"vae", "latent_dim"} & set(hparams):
            raise UserError(f"{ckpt} is not a vae_lightning checkpoint (no model settings); pass one written by train")
    else:  # the reference notebook's state_dict: fc1 (hidden, input), fc_mu (latent, hidden)
        weights = {f"model.{k}": v for k, v in state.items()}
        try:
            (hidden, inputs), latent = weights["model.fc1.weight"].shape, weights["model.fc_mu.weight"].shape[0]
        except (KeyError, AttributeError, ValueError):
            held = ", ".join(list(map(str, state))[:3]) or "nothing"
            raise UserError(
                f"{ckpt} holds {held}: neither a vae_lightning checkpoint nor the reference notebook's VAE state_dict"
            ) from None
        hparams = {"input_dim": inputs, "hidden_dim": hidden, "latent_dim": latent}
    check_finite(ckpt, weights)
    module = checkpoint_module(hparams, ckpt)
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"the weights in {ckpt} do not fit the VAE: {str(err).splitlines()[1].strip()}") from None
    return module, checkpoint_protocol(state)


def checkpoint_protocol(state: dict[str, Any]) -> dict[str, Any]:
    """The data protocol a checkpoint was trained on, as it holds it (unchecked: see trained_data);
    continuous MNIST for one that says none (the reference notebook's, or from before protocols)."""
    protocol = datamodule_state(state, MNISTDataModule) if "state_dict" in state else None
    return protocol if isinstance(protocol, dict) else {"dataset": "mnist", "binarize": "none"}


def module_from_checkpoint(ckpt: Path) -> VAEModule:
    return load_trained(ckpt)[0]


def trained_data(protocol: dict[str, Any], data_cfg: DictConfig) -> DictConfig:
    """Today's data settings with the checkpoint's protocol (dataset, binarization, held-out split)
    in place of today's: weights are evaluated, and continued, on what they were trained on."""
    data_cfg = data_cfg.copy()
    for key in PROTOCOL_KEYS:
        if key in protocol:
            value = protocol[key]
            # a checkpoint's values are data: checked, and never given to OmegaConf as a string it
            # would resolve (a "${oc.env:...}" would read the user's environment)
            valid = (
                value in SOURCES
                if key == "dataset"
                else value in BINARIZE
                if key == "binarize"
                else (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63)
            )
            if not valid:
                raise UserError(f"the checkpoint's data.{key}={value!r} is not a setting of this project; "
                                "pass a checkpoint written by vae_lightning.train")  # fmt: skip
            data_cfg[key] = value
    return data_cfg


def continued_data(state: dict[str, Any], data_cfg: DictConfig, named: set[str], ckpt: Path) -> DictConfig:
    """A continued run's data settings: its checkpoint's protocol, whatever today's defaults are. A
    protocol setting the user names (``data=...``, ``data.<key>=...``, an experiment) must agree:
    another dataset or protocol would change what the run means."""
    protocol = checkpoint_protocol(state)
    if "val_split" not in protocol and "state_dict" in state:
        protocol = {**protocol, "val_split": 0}  # a checkpoint leaves the split out when there is none
    kept = trained_data(protocol, data_cfg)
    for key in PROTOCOL_KEYS:
        if data_cfg.get(key) != kept.get(key) and named & {"data", f"data.{key}", "experiment"}:
            raise UserError(
                f"{ckpt} was trained with data.{key}={kept[key]}, and a continued run keeps its data: "
                f"drop what sets data.{key}={data_cfg[key]}, or start a new run without ckpt_path"
            )
    return kept
