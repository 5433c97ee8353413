"""``python -m vae_lightning.train [overrides]``: compose the config, train, test, report."""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from vae_lightning.errors import UserError
from vae_lightning.eval import evaluate
from vae_lightning.outputs import (
    check_writable,
    describe_disk_error,
    quiet_disk_errors_in_threads,
    saved_progress,
    write_json,
)
from vae_lightning.resume import check_same_model, plan_resume

log = logging.getLogger(__name__)


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


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


VALUE_CHECKS = (
    ("model.latent_dim", _positive_int, "an integer >= 1"),
    ("model.hidden_dim", _positive_int, "an integer >= 1"),
    ("model.lr", lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0, "a number > 0"),
    ("data.batch_size", _positive_int, "an integer >= 1"),
    ("data.eval_batch_size", _positive_int, "an integer >= 1"),
    ("trainer.max_epochs", _positive_int, "an integer >= 1"),
    ("eval.k", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 skips the evaluation)"),
)


def validate_config(cfg: DictConfig) -> None:
    """Refuse impossible values before any data is loaded or model built."""
    for key, ok, expected in VALUE_CHECKS:
        value = OmegaConf.select(cfg, key)
        if value is not None and not ok(value):
            raise UserError(f"{key}={value!r} is not valid: it must be {expected}")


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
    wanted = devices if isinstance(devices, int) and devices > 0 else 1
    if found == 0:
        raise UserError(
            f"trainer.accelerator={accelerator} but no CUDA GPU was found on this machine; "
            "use trainer.accelerator=auto (or trainer=cpu) to train on the CPU"
        )
    if wanted > found:
        raise UserError(f"trainer.devices={devices} but only {found} GPU(s) were found; use trainer.devices={found}")


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


def build_run(cfg: DictConfig, extra_callbacks: list | None = None) -> tuple:
    """Seed everything and build (datamodule, module, trainer) from the config."""
    validate_config(cfg)
    check_hardware(cfg.trainer)
    hand_ddp_this_job_alone(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build(cfg.data, "data")
    if "LOCAL_RANK" not in os.environ:  # the launching process: missing or corrupt data is said first
        datamodule.prepare_data()
    module = build(cfg.model, "model")
    callbacks = [build(node, "callbacks") for node in cfg.get("callbacks", {}).values()]
    loggers = [build(node, "logger") for node in cfg.get("logger", {}).values()]
    callbacks += extra_callbacks or []
    trainer: L.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    return datamodule, module, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, evaluate it; write ``metrics.json`` and return the metrics."""
    started = time.perf_counter()
    sweep_job = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    job_dir = Path(cfg.paths.output_dir) if sweep_job else None
    resume = plan_resume(cfg.get("ckpt_path"), cfg.paths.log_dir, job_dir, cfg.trainer.max_epochs)
    if resume.finished is not None:
        log.info(f"This job finished before, in {job_dir} (epoch {resume.finished['epochs']}): its results are kept")
        return resume.finished
    if resume.checkpoint is not None:
        check_same_model(resume.checkpoint, cfg.model)
    elif job_dir is not None and cfg.get("ckpt_path") == "last":
        log.info(f"Nothing to continue in {job_dir}: this job starts from epoch 1")
    run_dir = resume.run_dir
    if run_dir is not None and (run_dir / "epochs.csv").is_file():
        # continue the run where it lives: its checkpoints, tables and curves grow in place
        log.info(f"Continuing the run in {run_dir} from {resume.checkpoint.name}")
        check_writable(run_dir)  # say so now, not after an epoch of training
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    datamodule, module, trainer = build_run(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume.checkpoint)
    metrics: dict = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    tested = "weights after the last epoch"
    if cfg.get("test"):
        # loads the best checkpoint's weights into `module`, which the evaluation then uses
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update({k: float(v) for k, v in results[0].items()})
        tested = best or tested
    if not trainer.is_global_zero:
        return metrics
    out = Path(cfg.paths.output_dir)
    tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if cfg.eval.k > 0:
        evaluation = evaluate(
            module.model, datamodule.test_x, datamodule.test_y, out,
            cfg.eval.k, cfg.eval.batch_size, cfg.eval.chunk_rows, cfg.seed, cfg.eval.sample_seed, cfg.eval.scale,
            writer=tensorboards[0].experiment if tensorboards else None, step=trainer.global_step,
            ten_samples=False,
        )  # fmt: skip
        metrics.update(evaluation)
    metrics.update(
        epochs=trainer.current_epoch, checkpoint=tested, wall_seconds=round(time.perf_counter() - started, 1)
    )
    write_json(out / "metrics.json", metrics)
    for tb in tensorboards:  # TensorBoard's HPARAMS view: this run's settings beside its results
        tb.log_hyperparams(hyperparameters(cfg), {f"hp/{k}": metrics[k] for k in HP_METRICS if k in metrics})
    report(cfg, metrics)
    return metrics


HP_METRICS = ("train/loss", "val/loss", "val/bce", "val/kl", "test/loss", "test/iw_nll")


def hyperparameters(cfg: DictConfig) -> dict[str, float | int | str]:
    """The settings a sweep varies, flat, for TensorBoard's HPARAMS view."""
    return {
        "latent_dim": cfg.model.latent_dim,
        "hidden_dim": cfg.model.hidden_dim,
        "lr": cfg.model.lr,
        "init": cfg.model.init,
        "batch_size": cfg.data.batch_size,
        "max_epochs": cfg.trainer.max_epochs,
        "precision": str(cfg.trainer.precision),
        "seed": cfg.seed,
    }


def report(cfg: DictConfig, metrics: dict[str, float]) -> None:
    out = Path(cfg.paths.output_dir)
    keys = [f"{stage}/{term}" for stage in ("train", "val", "test") for term in ("loss", "bce", "kl")]
    keys.append("test/iw_nll")
    lines = [f"Outputs in {out}"]
    for name in ("epochs.csv", "loss_curves.png", "samples.png", "metrics.json", "checkpoints", "tensorboard"):
        if (out / name).exists():
            lines.append(f"  {out / name}")
    lines.append("Final per-image metrics:")
    lines += [f"  {key:<11} {metrics[key]:9.3f}" for key in keys if isinstance(metrics.get(key), float)]
    if "active_units" in metrics:
        lines.append(f"  active units {metrics['active_units']} of {cfg.model.latent_dim} (eval.k = {metrics['k']})")
    log.info("\n".join(lines))


def route_lightning_logs() -> None:
    """Lightning, imported before Hydra set up logging, gave its loggers their own stderr
    handler; hand their messages to Hydra's handlers instead, so train.log keeps them too."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if type(h) is not logging.StreamHandler]
        logger.propagate = True


def record_failure(out: Path, reason: str) -> None:
    """Leave the reason in the run dir, where a sweep summary finds it, and in train.log (the
    console already has it on stderr)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, f"error: {reason}", None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    try:
        write_json(out / "metrics.json", {"status": f"failed: {reason}"})
    except OSError:
        pass  # the disk that stopped the run may not take this either; the message is printed


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_disk_errors_in_threads()
    route_lightning_logs()
    try:
        metrics = train(cfg)
        return metrics.get(cfg.get("optimized_metric"))
    except UserError as err:
        reason = str(err)
    except Exception as err:
        out = Path(cfg.paths.output_dir)  # the resumed run's dir when train() continued one
        reason = describe_disk_error(err, out)
        if reason is None:  # a bug, ours or a library's: its traceback, then what was kept
            traceback.print_exc()
            reason = f"the run crashed on {type(err).__name__}: {err} (traceback above)"
        reason += f"; {saved_progress(out)}"
    print(f"error: {reason}", file=sys.stderr)
    record_failure(Path(cfg.paths.output_dir), reason)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return None  # the other jobs go on; the sweep summary lists this one as failed
    raise SystemExit(1)


if __name__ == "__main__":
    main()
