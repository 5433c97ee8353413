"""Where a run's processes and TensorBoard files go: the ``${tensorboard:...}`` resolver, how many
processes the trainer config asks for, and ending a DDP process group cleanly."""

from __future__ import annotations

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
