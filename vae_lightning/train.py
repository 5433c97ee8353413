"""``python -m vae_lightning.train [overrides]``: compose the config, train, test, report."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from vae_lightning.errors import UserError
from vae_lightning.figures.explorer import write_report
from vae_lightning.launch import end_process_group, processes
from vae_lightning.names import TRAIN_SECONDS, WALL_SECONDS
from vae_lightning.outputs import describe_disk_error, quiet_disk_errors_in_threads, write_json
from vae_lightning.plugin_configs import CONFIG_PATH
from vae_lightning.runs.building import build_run
from vae_lightning.runs.endings import failed, stopped
from vae_lightning.runs.planning import plan
from vae_lightning.runs.results import announce, record, send_outputs
from vae_lightning.runs.resume import Resume
from vae_lightning.runs.rundir import forget_continuation, hold_run_dir, release_run_dir
from vae_lightning.tracking.mlflow_logger import mlflow_loggers
from vae_lightning.training import stopping
from vae_lightning.training.callbacks import last_epoch_metrics, stop_requested, training_seconds
from vae_lightning.training.checkpoints import hand_over, saved_progress
from vae_lightning.workarounds import hand_ddp_this_job_alone, route_lightning_logs

log = logging.getLogger(__name__)


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
        return failed(out, str(err), refused=True)
    try:
        metrics = train(cfg, planned)
        end_process_group()
        return metrics.get(cfg.get("optimized_metric"))
    except SIGTERMException:  # a scheduler's stop or pre-emption: the whole sweep stops too
        return stopped(out, stopping.stop_signal())
    except UserError as err:
        reason = str(err)
    except Exception as err:
        reason = describe_disk_error(err, out)
        if reason is None:  # a bug, ours or a library's: its traceback, then what was kept
            traceback.print_exc()
            reason = f"the run crashed on {type(err).__name__}: {err} (traceback above)"
        reason += f"; {saved_progress(out)}"
    return failed(out, reason)


if __name__ == "__main__":
    main()
