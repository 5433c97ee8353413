"""``python -m vae_lightning.train [overrides]``: compose the config, train, test, report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vae_lightning.launch import end_process_group, processes
from vae_lightning.outputs import quiet_disk_errors_in_threads
from vae_lightning.plugin_configs import CONFIG_PATH
from vae_lightning.runs.building import build_run
from vae_lightning.runs.endings import ended
from vae_lightning.runs.finishing import finish
from vae_lightning.runs.planning import start_job
from vae_lightning.runs.resume import Resume
from vae_lightning.runs.rundir import release_run_dir
from vae_lightning.tracking.mlflow_logger import mlflow_loggers
from vae_lightning.training.callbacks import training_seconds
from vae_lightning.training.checkpoints import hand_over
from vae_lightning.workarounds import hand_ddp_this_job_alone, route_lightning_logs

log = logging.getLogger(__name__)


def train(cfg: DictConfig, planned: tuple[Resume, dict | None]) -> dict:
    """Fit, then test (and evaluate) the best checkpoint of the ``plan`` (``finish``); return the metrics."""
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
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    return finish(cfg, trainer, module, datamodule, epochs=trainer.current_epoch,
                  train_seconds=training_seconds(trainer), best=best, started=started)  # fmt: skip


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
    planned = start_job(cfg, out)
    if planned is None:
        return None

    def work() -> float | None:
        metrics = train(cfg, planned)
        end_process_group()
        return metrics.get(cfg.get("optimized_metric"))

    return ended(out, work)


if __name__ == "__main__":
    main()
