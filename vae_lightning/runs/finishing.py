"""What a training job does once its weights are trained: ``metrics.json`` (the finished training
is kept whatever happens next), the test pass and the bound on the best checkpoint, the report and
the trackers. Shared by a job alone (``train``) and jobs trained as one model (``runs.replicas``)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from vae_lightning.data.datamodule import MNISTDataModule
from vae_lightning.figures.explorer import write_report
from vae_lightning.names import TRAIN_SECONDS, WALL_SECONDS
from vae_lightning.outputs import write_json
from vae_lightning.runs.results import announce, record, send_outputs
from vae_lightning.training.callbacks import last_epoch_metrics, stop_requested
from vae_lightning.training.module import VAEModule


def finish(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: VAEModule,
    datamodule: MNISTDataModule,
    *,
    epochs: int,
    train_seconds: float,
    best: str,
    started: float,
    **extra: object,
) -> dict:
    """Write ``metrics.json`` of the trained weights, then test (and evaluate) the ``best``
    checkpoint with ``trainer``, report, and return the metrics (``extra`` are recorded too)."""
    out = Path(cfg.paths.output_dir)
    metrics: dict = last_epoch_metrics(trainer)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    metrics.update(epochs=epochs, latent_dim=cfg.model.latent_dim, **datamodule.protocol(), **extra)
    metrics[TRAIN_SECONDS] = train_seconds
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
