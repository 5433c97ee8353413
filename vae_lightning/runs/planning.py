"""What a run is before anything is written: new, continued (and from which checkpoint, with its
own model and data), or finished before. Every refusal here comes before the run's dir is touched."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vae_lightning.errors import UserError
from vae_lightning.launch import slurm_restarts
from vae_lightning.runs.building import continued_data
from vae_lightning.runs.checks import check_new_keys
from vae_lightning.runs.endings import failed
from vae_lightning.runs.resume import Resume, changed_data_settings, check_epochs_left, keep_run_model, plan_resume
from vae_lightning.runs.rundir import forget_continuation, hold_run_dir, requeued_ckpt_path
from vae_lightning.training import stopping
from vae_lightning.training.checkpoints import check_finite, load_checkpoint
from vae_lightning.training.replicas import REPLICA_KEY

log = logging.getLogger(__name__)


def plan(cfg: DictConfig, replicas: bool = False) -> tuple[Resume, dict | None]:
    """What this run is (new, continued, or finished before) and the checkpoint it continues, read
    once; every refusal here comes before anything is written. ``replicas``: the job trains as one
    of replicas, and may continue their checkpoints."""
    out = Path(cfg.paths.output_dir)
    sweep_job = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    check_new_keys(overrides)
    ckpt_path = cfg.get("ckpt_path")
    if sweep_job and (requeued := requeued_ckpt_path(ckpt_path, out)) != ckpt_path:  # (a single run's: RunDir)
        log.info(f"Slurm requeued this job ({slurm_restarts()} time(s)): it continues from its own last.ckpt")
        ckpt_path = requeued
    resume = plan_resume(ckpt_path, out, cfg.trainer.max_epochs, sweep_job)
    if resume.finished is not None:
        return resume, None
    checkpoint = None if resume.checkpoint is None else load_checkpoint(resume.checkpoint)  # read once
    if resume.checkpoint is not None:
        if isinstance(checkpoint, dict) and REPLICA_KEY in checkpoint and not replicas:
            raise UserError(f"{resume.checkpoint} was written by a sweep trained as one model; continue it with "
                            "hydra/launcher=replicas (and the sweep's -m, overrides and hydra.sweep.dir)")  # fmt: skip
        check_epochs_left(resume.checkpoint, checkpoint, cfg.trainer.max_epochs)
        named = {override.split("=")[0].lstrip("+~") for override in overrides}
        # the run's own model and data, not today's defaults
        kept = keep_run_model(resume.checkpoint, checkpoint, cfg.model, named)
        check_finite(resume.checkpoint, checkpoint["state_dict"] if isinstance(checkpoint["state_dict"], dict) else {})
        data = continued_data(checkpoint, cfg.data, named, resume.checkpoint)
        kept += [f"data.{key}={data[key]}" for key in data if data[key] != cfg.data.get(key)]
        cfg.data = data
        where = f"the run in {out}" if resume.checkpoint.parent.parent == out.resolve() else f"in {out}"
        its_own = f" with its own {', '.join(kept)}" if kept else ""
        log.info(f"Continuing {where} from {resume.checkpoint}{its_own}{changed_data_settings(cfg, out)}")
    elif sweep_job and ckpt_path == "last":
        log.info(f"Nothing to continue in {out}: this job starts from epoch 1")
    return resume, checkpoint


def start_job(cfg: DictConfig, out: Path, replicas: bool = False) -> tuple[Resume, dict | None] | None:
    """Hold the job's dir (one writer, until the job ends) and ``plan`` it; None when it is refused
    before anything was written (said in one line; a finished run's dir stays as it was)."""
    stopping.listen(new_job=True)  # a stop signal from here on stops the run with everything kept
    try:
        hold_run_dir(out)
        return plan(cfg, replicas)
    except UserError as err:
        forget_continuation(out, HydraConfig.get().output_subdir)
        return failed(out, str(err), refused=True)
