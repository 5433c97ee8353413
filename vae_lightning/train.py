"""``python -m vae_lightning.train [overrides]``: compose the config, train, test, report."""

from __future__ import annotations

import logging
import signal
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from vae_lightning.errors import UserError
from vae_lightning.figures.explorer import write_report
from vae_lightning.launch import end_process_group, processes, slurm_restarts
from vae_lightning.names import TRAIN_SECONDS, WALL_SECONDS
from vae_lightning.outputs import describe_disk_error, quiet_disk_errors_in_threads, write_json
from vae_lightning.plugin_configs import CONFIG_PATH
from vae_lightning.runs.building import build_run, continued_data
from vae_lightning.runs.checks import check_new_keys
from vae_lightning.runs.results import announce, discard_if_unstarted, record, record_failure, send_outputs
from vae_lightning.runs.resume import Resume, changed_data_settings, check_epochs_left, keep_run_model, plan_resume
from vae_lightning.runs.rundir import forget_continuation, hold_run_dir, release_run_dir, requeued_ckpt_path
from vae_lightning.tracking.mlflow_logger import mlflow_loggers
from vae_lightning.training import stopping
from vae_lightning.training.callbacks import last_epoch_metrics, stop_requested, training_seconds
from vae_lightning.training.checkpoints import check_finite, hand_over, load_checkpoint, saved_progress
from vae_lightning.workarounds import hand_ddp_this_job_alone, route_lightning_logs

log = logging.getLogger(__name__)


def plan(cfg: DictConfig) -> tuple[Resume, dict | None]:
    """What this run is (new, continued, or finished before) and the checkpoint it continues, read
    once; every refusal here comes before anything is written."""
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


def train(cfg: DictConfig, planned: tuple[Resume, dict | None]) -> dict:
    """Fit, then test (and evaluate) the best checkpoint of the ``plan``; write ``metrics.json``
    and return the metrics."""
    started = time.perf_counter()
    out = Path(cfg.paths.output_dir)
    resume, checkpoint = planned
    if resume.finished is not None:
        log.info(f"This job finished before, in {out} (epoch {resume.finished['epochs']}): its results are kept")
        return resume.finished

    if (count := processes(cfg.trainer)) > 1:
        log.info(f"{count} processes, each taking data.batch_size={cfg.data.batch_size} images a step")
    hand_ddp_this_job_alone(cfg, resume.checkpoint)
    datamodule, module, trainer = build_run(cfg)
    if checkpoint is not None:
        hand_over(trainer, resume.checkpoint, checkpoint)
        for tracker in mlflow_loggers(trainer.loggers):  # the history up to the checkpoint, where MLflow lacks it
            tracker.backfill(checkpoint)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume.checkpoint)
    metrics: dict = last_epoch_metrics(trainer)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    metrics.update(epochs=trainer.current_epoch, latent_dim=cfg.model.latent_dim, **datamodule.protocol())
    metrics[TRAIN_SECONDS] = training_seconds(trainer)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    metrics["checkpoint"] = "weights after the last epoch"
    if trainer.is_global_zero:  # the finished training is kept whatever happens next
        write_json(out / "metrics.json", metrics)
    if cfg.get("test"):
        # the test ELBO, and with eval.k > 0 the importance-weighted bound and the figures
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update({k: float(v) for k, v in results[0].items()}, checkpoint=best or metrics["checkpoint"])
        metrics["k"] = cfg.eval.k
        if stop_requested(trainer):  # nothing checks after the last test batch
            raise SIGTERMException
    metrics[WALL_SECONDS] = round(time.perf_counter() - started, 1)
    if trainer.is_global_zero:
        record(cfg, metrics, trainer.loggers)
        write_report(out, module.model.eval(), datamodule)  # the tested weights, in a page of its own
        send_outputs(out, trainer.loggers)
        announce(out, metrics, trainer.loggers)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_disk_errors_in_threads()
    route_lightning_logs()
    out = Path(cfg.paths.output_dir)
    try:
        return _job(cfg, out)
    finally:
        release_run_dir(out)


def _job(cfg: DictConfig, out: Path) -> float | None:
    """Plan, train and report one run (or sweep job), every way it can end said in one line."""
    stopping.listen(new_job=True)  # a stop signal from here on stops the run with everything kept
    try:
        hold_run_dir(out)  # one writer per run dir, until this job ends
        planned = plan(cfg)
    except UserError as err:  # refused before anything was written: a finished run's dir stays as it was
        forget_continuation(out, HydraConfig.get().output_subdir)
        return _failed(out, str(err), refused=True)
    try:
        metrics = train(cfg, planned)
        end_process_group()
        return metrics.get(cfg.get("optimized_metric"))
    except SIGTERMException:  # a scheduler's stop or pre-emption: the whole sweep stops too
        return _stopped(out, stopping.stop_signal())
    except UserError as err:
        reason = str(err)
    except Exception as err:
        reason = describe_disk_error(err, out)
        if reason is None:  # a bug, ours or a library's: its traceback, then what was kept
            traceback.print_exc()
            reason = f"the run crashed on {type(err).__name__}: {err} (traceback above)"
        reason += f"; {saved_progress(out)}"
    return _failed(out, reason)


def _stopped(out: Path, signum: int | None) -> None:
    """Say what a stop signal stopped and what was kept; in a submitit job asked to requeue (its
    signal came, alone or after Slurm's SIGTERM), hand the job to submitit, which requeues it and
    ends this process. Exit 128 + the signal, with no result for a launcher to read: a job Slurm
    requeues runs again and gives its result then. ``signum`` None: another process of the run got
    the signal (DDP: they stop together), and this one says so rather than name a signal it never got."""
    by = "with the run's other processes (one of them got a stop signal)" if signum is None else None
    signum = signum or signal.SIGTERM
    if not stopping.requeue_asked(wait_s=5.0 if stopping.requeue_signal() else 0.0):
        reason = f"stopped {by or 'by ' + signal.Signals(signum).name}; {saved_progress(out)}"
        print(f"error: {reason}", file=sys.stderr)
        record_failure(out, reason)
        raise SystemExit(128 + signum)
    name, kept = stopping.requeue_signal().name, saved_progress(out, requeued=True)  # (reads last.ckpt)
    print(f"error: stopped by {name} (Slurm's time limit or a pre-emption); {kept}", file=sys.stderr)
    record_failure(out, f"stopped by {name}; {kept}")
    if (not_requeued := stopping.requeue()) is None:  # (once requeued, submitit ends the process)
        raise SystemExit(128 + signum)
    reason = f"stopped by {name}, and submitit did not requeue the job: {not_requeued}; {saved_progress(out)}"
    return _failed(out, reason)  # a sweep's summary says so


def _failed(out: Path, reason: str, refused: bool = False) -> None:
    """Say why the job stopped. A sweep job records it where the sweep summary finds it, and the
    other jobs go on. A single run's dir is removed when nothing started in it; otherwise the
    reason is recorded there, unless the run was ``refused`` before it began (its dir stays as it
    was). Then exit 1."""
    print(f"error: {reason}", file=sys.stderr)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        record_failure(out, reason)
        return None
    if not discard_if_unstarted(out) and not refused:
        record_failure(out, reason)
    raise SystemExit(1)


if __name__ == "__main__":
    main()
