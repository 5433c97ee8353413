"""What the process needs under Hydra before a run starts: Lightning's messages in train.log, and
DDP jobs inside a multirun."""

from __future__ import annotations

import logging
import os
import sys

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf


def route_lightning_logs() -> None:
    """Lightning, imported before Hydra set up logging, gave its loggers their own stderr
    handler; hand their messages to Hydra's handlers instead, so train.log keeps them too."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if type(h) is not logging.StreamHandler]
        logger.propagate = True


def hand_ddp_this_job_alone(cfg: DictConfig) -> None:
    """Lightning starts the other DDP processes by re-running the command line. In a Hydra
    multirun that command is the whole sweep, so each child would run every job; give it this
    job's overrides and directory instead."""
    if "ddp" not in str(cfg.trainer.get("strategy", "")) or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    OmegaConf.set_readonly(hydra_cfg, False)
    hydra_cfg.run.dir = hydra_cfg.runtime.output_dir  # read by Lightning for the children
    # the previous job's process group and rendezvous settings would make Lightning think its
    # processes already exist: start this job's group afresh
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK"):
        os.environ.pop(key, None)
