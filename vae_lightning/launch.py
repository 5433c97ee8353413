"""What the process needs before a run starts: Lightning's messages in train.log, DDP jobs inside
a multirun, and no NVML probe on every optimizer step of a machine without a GPU."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf


def tensorboard_location(part: str, *, _root_: DictConfig) -> str:
    """``${tensorboard:save_dir}`` and ``${tensorboard:name}`` in ``conf/logger/tensorboard.yaml``:
    ``<run dir>/tensorboard`` for a run, ``<sweep dir>/<what this job varies>`` for a sweep job, so
    that ``tensorboard --logdir <sweep dir>`` names each job's curves by its settings."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        job = HydraConfig.get()
        return job.sweep.dir if part == "save_dir" else job.job.override_dirname or f"job_{job.job.num}"
    return _root_.paths.output_dir if part == "save_dir" else "tensorboard"


if not OmegaConf.has_resolver("tensorboard"):
    OmegaConf.register_new_resolver("tensorboard", tensorboard_location)


def route_lightning_logs() -> None:
    """Lightning, imported before Hydra set up logging, gave its loggers their own stderr
    handler; hand their messages to Hydra's handlers instead, so train.log keeps them too."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if type(h) is not logging.StreamHandler]
        logger.propagate = True


def skip_nvml_probe_without_gpu() -> None:
    """Importing Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (so that asking for CUDA does not
    initialise it in a process that later forks). torch's optimizers ask on every step, and where
    no GPU has been initialised, which is every CPU run of a CUDA build of torch, each ask loads
    NVML again: ~30-45 us a step, 1-2 % of a CPU training step (docs/performance.md). Where that
    probe finds no GPU there is nothing to protect, so the runtime's own check, cached after its
    first call, answers instead. Machines with a GPU keep Lightning's setting."""
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and not torch.cuda.is_available():
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


def end_process_group() -> None:
    """A DDP process ends its process group itself when its job ends. Left to the interpreter's
    exit, gloo's threads can be torn down while in use ("terminate called without an active
    exception"), and Lightning then kills the whole sweep for a child that crashed on its way out."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def processes(trainer_cfg: DictConfig) -> int:
    """How many training processes the trainer config asks for (devices x nodes)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    count = len(devices) if OmegaConf.is_list(devices) else devices if isinstance(devices, int) else 1
    if count == -1 or devices == "auto":  # every device found
        count = max(1, torch.cuda.device_count()) if trainer_cfg.get("accelerator") in ("gpu", "cuda") else 1
    return count * int(trainer_cfg.get("num_nodes", 1) or 1)


def hand_ddp_this_job_alone(cfg: DictConfig, checkpoint: Path | None) -> None:
    """Lightning starts the other DDP processes by re-running the command line. In a Hydra
    multirun that command is the whole sweep (or search), so each child would run every job; give
    it this job's overrides, with the checkpoint this job continues, and its directory instead."""
    if processes(cfg.trainer) < 2 or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    # hparams_search=... would make each child a search of its own; ckpt_path=last would make it
    # look for a run of its own
    job = [o for o in hydra_cfg.overrides.task if not o.startswith(("hparams_search=", "ckpt_path="))]
    sys.argv = [sys.argv[0], *job, *([f"ckpt_path={checkpoint}"] if checkpoint else [])]
    OmegaConf.set_readonly(hydra_cfg, False)
    hydra_cfg.run.dir = hydra_cfg.runtime.output_dir  # read by Lightning for the children
    # the previous job's process group and rendezvous settings would make Lightning think its
    # processes already exist: start this job's group afresh
    end_process_group()
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK"):
        os.environ.pop(key, None)
