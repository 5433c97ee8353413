"""Workarounds of the libraries' internals, each beside the upstream issue it works around (or a
line saying none was found, and why it is needed); the rest of the project calls these and never
reaches into Lightning, Hydra, MLflow or torch itself. Re-implementations for speed that use only
public APIs stay with their part and cite their measurement there (``training.module.PerImageMean``,
torchmetrics#3434; ``model.likelihoods``' pixel sums; ``model.nets.conv_transpose_by_fold``)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from vae_lightning.launch import end_process_group, processes


def silence_unactionable_warnings() -> None:
    """Warnings no user can act on, on every run."""
    # Lightning builds torch's LeafSpec, which torch deprecates (Lightning#21326, fixed after 2.6)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # the data are tensors on the training device, indexed once per batch: worker processes would
    # only copy them (Lightning suggests workers for every DataLoader: its design, no issue to cite)
    warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")
    # a continued run writes into its own checkpoints/ by design (runs/resume.py; Lightning's warning
    # is meant for a new run, no issue to cite)
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def silence_lightning_tips() -> None:
    """Lightning 2.6 prints an advertisement for its cloud logger on every run that does not use it
    (its logger connector's ``configure_logger``, with no setting to turn it off). Upstream: none
    found (Lightning's tracker searched for the litlogger tip)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLitLoggerTip())


@contextlib.contextmanager
def quiet_onnx_exporter() -> Iterator[None]:
    """torch.onnx.export (dynamo) and onnxscript's optimiser print their passes ("No unused functions
    to remove", ...) whatever ``verbose`` says, on stdout and through logging; a user sees only the
    files written, and any real error still raises. Upstream: pytorch#26779 (the exporter's output
    with verbose=False, closed for the TorchScript exporter); none found for the dynamo exporter's."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def datamodule_state(checkpoint: dict[str, Any], datamodule_class: type) -> Any:
    """What a DataModule's ``state_dict`` saved in a Lightning checkpoint: Lightning files it under
    the class's ``__qualname__`` (its checkpoint connector; no public accessor), so a renamed class
    would lose it. Upstream: none found; the key is Lightning's checkpoint format."""
    return checkpoint.get(datamodule_class.__qualname__)


def refused_global(err: Exception) -> str | None:
    """The class a ``torch.load(weights_only=True)`` refused, read from its error text (torch gives it
    no attribute; the wording changed between releases), or None for a file that is not a pickle.
    Upstream: none found (torch's UnpicklingError carries only its message)."""
    found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", str(err))
    return found.group(1) if found else None


def route_lightning_logs() -> None:
    """Lightning, imported before Hydra set up logging, gave its loggers their own stderr
    handler; hand their messages to Hydra's handlers instead, so train.log keeps them too.
    Upstream: Lightning's loggers bypass Hydra's files (lightning-hydra-template#396, Lightning#4621)."""
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
    first call, answers instead. Machines with a GPU keep Lightning's setting.
    Upstream: Lightning sets the variable since Lightning#15110 (torch's check: pytorch#85951)."""
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and not torch.cuda.is_available():
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


def hand_ddp_this_job_alone(cfg: DictConfig, checkpoint: Path | None) -> None:
    """Lightning starts the other DDP processes by re-running the command line. In a Hydra
    multirun that command is the whole sweep (or search), so each child would run every job; give
    it this job's overrides, with the checkpoint this job continues, and its directory instead.
    Upstream: Lightning#11300 and hydra#2070 (Lightning's fix, #11617, re-runs the whole sweep)."""
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


def without_lightning_requeue(trainer_cfg: DictConfig) -> DictConfig:
    """In a Slurm job, the trainer config with Lightning's Slurm environment minus its own requeue.
    Left on, Lightning handles SIGUSR1 by saving ``hpc_ckpt_N.ckpt`` beside the run, marking every
    logger finished and running ``scontrol requeue`` while training goes on: a second requeuer beside
    submitit's (``stopping``), and they fight (Lightning#14893; submitit#1709 moved submitit's signal
    to USR2 for it). Its own off switch is ``SLURMEnvironment(auto_requeue=False)`` (Lightning#10601)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return trainer_cfg
    trainer_cfg = trainer_cfg.copy()
    with read_write(trainer_cfg):
        plugins = list(trainer_cfg.get("plugins") or [])
        target = "lightning.fabric.plugins.environments.SLURMEnvironment"
        trainer_cfg.plugins = [*plugins, {"_target_": target, "auto_requeue": False}]
    return trainer_cfg


def hydra_quoted(value: str) -> str:
    """``value`` as a single-quoted Hydra override value: a quote is escaped with a backslash, and
    backslashes just before a quote (or the closing one) are doubled, as Hydra's grammar reads them."""
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + "'"


def set_for_every_job(config: DictConfig, key: str, value: str | list[str]) -> None:
    """Set the Hydra setting ``key`` in the launching process's config and for every job of a
    multirun: Hydra composes each job's config again from the Hydra overrides, not from this one
    (hydra#1945: each job is composed afresh, from the files and the overrides)."""
    with read_write(config.hydra):
        OmegaConf.update(config, key, value)
    # a string quoted, as a path may hold = or , (or a quote: escaped as Hydra's grammar reads it)
    override = f"[{','.join(value)}]" if isinstance(value, list) else hydra_quoted(value)
    config.hydra.overrides.hydra.append(f"{key}={override}")


def read_submitit_jobs_without_a_result() -> None:
    """In a sweep's launching process: a submitit job that ended without a result (cancelled with
    ``scancel``, killed at its time limit or for memory) is one line, its result None as a failed
    sweep job's is (``train._failed``), and the other jobs' results and the sweep summary are kept;
    its run dir says how it stopped. hydra-submitit-launcher 1.2's ``launch`` reads the results with
    ``[j.results()[0] for j in jobs]``, and submitit's ``Job.results`` raises UncompletedJobError for
    such a job, so the launching process ended in that traceback with no summary. Upstream:
    hydra#1377 (launchers and partial failures), hydra#1928 (failed submitit jobs)."""
    try:
        from submitit.core import core, utils
    except ImportError:  # (the launchers are installed with the project; nothing to do without them)
        return
    if getattr(core.Job.results, "keeps_the_sweep", False):
        return
    results = core.Job.results

    def results_or_none(job: Any) -> list[Any]:
        try:
            return results(job)
        except utils.UncompletedJobError:
            print(f"error: submitit job {job.job_id} ended without a result ({job.state}); its run dir keeps "
                  "what it finished", file=sys.stderr)  # fmt: skip
            return [JobReturn(status=JobStatus.COMPLETED)]

    results_or_none.keeps_the_sweep = True  # type: ignore[attr-defined]
    core.Job.results = results_or_none


def config_errors_in_one_line() -> None:
    """A config Hydra cannot compose (``model.latentdim=3``, ``model=convv``) is reported by
    ``hydra._internal.utils.run_and_report`` as Hydra's message, OmegaConf's key dump and a hint
    about HYDRA_FULL_ERROR, several lines a newcomer must decode (facebookresearch/hydra#1912,
    #349); it has no hook, so its module attribute is wrapped. The error is printed as one line
    (``errors.config_error_line``), exit status 1 as before; HYDRA_FULL_ERROR=1 still raises it."""
    import hydra._internal.utils as hydra_utils
    from hydra.errors import ConfigCompositionException, OverrideParseException

    from vae_lightning.errors import config_error_line

    report = hydra_utils.run_and_report
    if getattr(report, "one_line", False):
        return

    def run_and_report(func: Any) -> Any:
        def composed() -> Any:
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"error: {config_error_line(err)}", file=sys.stderr)
                sys.exit(1)

        return report(composed)

    run_and_report.one_line = True
    hydra_utils.run_and_report = run_and_report


class MLflowLoggerState:
    """What this project reads and sets of Lightning's ``MLFlowLogger`` (2.6), whose client, store,
    experiment, run and checkpoint callback are private attributes: every such access is here.
    The logger opens its run at its first log and offers no public way to log into a run found
    before training (this project opens the run when the logger is built, so that a store that is
    down is one line before anything starts, and continues a run dir's own run); its ``run_id=``
    argument needs the run before the logger exists, while the store is opened by the logger.
    Upstream: none found (Lightning's tracker searched for MLFlowLogger and an existing run)."""

    def __init__(self, logger: Any) -> None:
        self._logger = logger

    @property
    def client(self) -> Any:
        return self._logger._mlflow_client

    @property
    def tracking_uri(self) -> str:
        return self._logger._tracking_uri

    @property
    def artifact_location(self) -> str | None:
        return self._logger._artifact_location

    @property
    def run_name(self) -> str | None:
        return self._logger._run_name

    @property
    def experiment_id(self) -> str | None:
        return self._logger._experiment_id

    @experiment_id.setter
    def experiment_id(self, value: str) -> None:
        self._logger._experiment_id = value

    @property
    def run_id(self) -> str | None:
        return self._logger._run_id

    @property
    def opened(self) -> bool:
        """Whether the logger logs into a run (Lightning's ``_initialized``)."""
        return bool(self._logger._initialized)

    def adopt(self, run_id: str) -> None:
        """Log into the run ``run_id`` from here on, as if the logger had made it."""
        self._logger._run_id, self._logger._initialized = run_id, True

    def log_checkpoints(self) -> None:
        """``log_model=True``: the checkpoints, as Lightning logs them when training ends."""
        if self._logger._checkpoint_callback:
            self._logger._scan_and_log_checkpoints(self._logger._checkpoint_callback)


def set_trainer_progress(trainer: Any, epochs: int, steps: int) -> None:
    """A trainer that did not fit (a job trained as one of replicas, ``runs.replica_launcher``)
    counts the epochs and optimizer steps its job trained, so that its test pass logs at the
    step a job alone logs at (Lightning logs at the fit loop's step counters). Lightning sets them
    only in its own fit or from a checkpoint's loop state, which a test pass does not restore.
    Upstream: none found (no public setter for ``global_step``; Lightning's tracker searched)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    epoch_loop._batches_that_stepped = steps
    epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = steps
    trainer.fit_loop.epoch_progress.current.completed = epochs
