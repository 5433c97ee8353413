"""``hydra/launcher=replicas``: a multirun's jobs that share every shape (typically ``seed=0,1,2``,
and lr, beta's schedule, the binarization...) trained as one model in this process
(``training.replicas``), each job's dir holding what it holds when the job runs alone.

A Hydra launcher, because that is how users start sweeps. Each job is started in its dir as
Hydra's basic launcher starts it (``run_job``: its config saved, its log file, the callbacks),
planned and built as a job alone (``build_run``, under its own seed); then the jobs of one shape
train together; then each, in its dir again, is tested, evaluated and reported alone (``finish``).
Jobs of different shapes form separate groups, trained one after the other."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from vae_lightning.data.datamodule import MNISTDataModule
from vae_lightning.data.replica_batches import SHAPE_KEYS, ReplicaBatches
from vae_lightning.errors import UserError
from vae_lightning.launch import processes
from vae_lightning.outputs import quiet_disk_errors_in_threads
from vae_lightning.runs.building import build_run
from vae_lightning.runs.endings import ended, failed
from vae_lightning.runs.finishing import finish
from vae_lightning.runs.planning import start_job
from vae_lightning.runs.rundir import release_run_dir
from vae_lightning.training.callbacks import training_seconds
from vae_lightning.training.module import VAEModule
from vae_lightning.training.replica_fit import ReplicaJob, fit_replicas
from vae_lightning.training.replicas import ReplicaGroup, global_generator, objective_of
from vae_lightning.workarounds import route_lightning_logs, set_trainer_progress

log = logging.getLogger(__name__)

# trainer settings the replicas' loop does not honour: at any other value, a job is refused
TRAINER_DEFAULTS = {"precision": "32-true", "check_val_every_n_epoch": 1, "accumulate_grad_batches": 1,
                    "gradient_clip_val": None, "max_time": None, "val_check_interval": None,
                    "max_steps": -1}  # fmt: skip


@dataclass
class _Started:
    """A job planned and built in its dir, waiting for its group to train."""

    cfg: DictConfig
    out: Path
    job: ReplicaJob
    generator: Any
    checkpoint: dict | None = None  # the job's own last, when the sweep is continued
    started: float = field(default_factory=time.perf_counter)
    steps: int = 0  # optimizer steps trained
    replicas: int = 1
    error: BaseException | None = None  # what ended the whole group's training


def _refusal(cfg: DictConfig) -> str | None:
    trainer = cfg.trainer
    if processes(trainer) > 1:
        return f"trainer.devices={trainer.get('devices')} (one process trains every replica)"
    for key, default in TRAINER_DEFAULTS.items():
        if key in trainer and trainer[key] != default:
            return f"trainer.{key}={trainer[key]}"
    for key in ("limit_train_batches", "limit_val_batches"):
        value = trainer.get(key)
        if value is not None and not (isinstance(value, int) or value == 1.0):
            return f"trainer.{key}={value} (a fraction; give a number of batches)"
    return None


def _first_epoch(started: _Started) -> tuple[int, int]:
    """(epoch, optimizer step) the job starts from: 0 or its checkpoint's next."""
    checkpoint = started.checkpoint
    return (0, 0) if checkpoint is None else (checkpoint["epoch"] + 1, checkpoint["global_step"])


def _shape(started: _Started) -> str:
    """What the jobs of one group share: the model's settings, the objective's, the batches', and
    where they start (jobs continued from different epochs train in different groups)."""
    module, dm = started.job.module, started.job.datamodule
    batches = tuple(getattr(dm, key) for key in SHAPE_KEYS)
    return repr((module.model.settings, objective_of(module), batches, _first_epoch(started)))


def _limit(cfg: DictConfig, key: str) -> int | None:
    value = cfg.trainer.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class ReplicaLauncher(Launcher):
    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.started: dict[Path, _Started | float | None] = {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = []
        for number, overrides in enumerate(job_overrides, start=initial_job_idx):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id, cfg.hydra.job.num = f"{cfg.hydra.job.name}_{number}", number
            configs.append(cfg)
        for cfg in configs:  # each job started in its dir as a job alone starts
            self._in_job_dir(cfg, self._start)
        groups: dict[str, list[_Started]] = {}
        for started in self.started.values():
            if isinstance(started, _Started):
                groups.setdefault(_shape(started), []).append(started)
        if len(groups) > 1:
            log.info(f"{len(groups)} groups of jobs with different shapes: each trains as one model in turn")
        for group in groups.values():
            self._train(group)
        returns, stop = [], None
        for cfg in configs:  # a stop signal ends every job of the sweep, each said in its dir
            try:
                returns.append(self._in_job_dir(cfg, self._finish))
            except SystemExit as exit_:
                stop = stop or exit_
        if stop is not None:
            raise stop
        return returns

    def _in_job_dir(self, cfg: DictConfig, task: TaskFunction) -> JobReturn:
        return run_job(hydra_context=self.hydra_context, task_function=task, config=cfg,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")  # fmt: skip

    def _start(self, cfg: DictConfig) -> None:
        quiet_disk_errors_in_threads()
        route_lightning_logs()
        out = Path(cfg.paths.output_dir)
        planned = start_job(cfg, out, replicas=True)
        if planned is None:  # refused, said in one line
            self.started[out] = None
            return
        resume, checkpoint = planned
        if resume.finished is not None:
            log.info(f"This job finished before, in {out} (epoch {resume.finished['epochs']}): its results are kept")
            self.started[out] = resume.finished.get(cfg.get("optimized_metric"))
            return

        def build() -> None:
            if (reason := _refusal(cfg)) is not None:
                raise UserError(f"hydra/launcher=replicas trains jobs with the default "
                                f"{reason.split('=')[0]} only (here {reason}); drop it, or run this sweep "
                                "with the basic launcher")  # fmt: skip
            datamodule, module, trainer = build_run(cfg)
            # what the job's global generator would draw next, alone: its noise and binarization
            generator = global_generator(trainer.strategy.root_device)
            self.started[out] = _Started(cfg, out, ReplicaJob(trainer, module, datamodule), generator, checkpoint)

        self.started[out] = None
        ended(out, build)

    def _train(self, group: list[_Started]) -> None:
        """Train one group as one model; a failure of the whole group is each job's."""
        first = group[0]
        device = first.job.trainer.strategy.root_device

        def work() -> None:
            modules: list[VAEModule] = [s.job.module.to(device) for s in group]
            first_epoch, first_step = _first_epoch(first)
            replica = ReplicaGroup(modules, [s.generator for s in group], first_step)
            for index, s in enumerate(group):
                if s.checkpoint is not None:
                    s.job.restore(s.checkpoint, replica, index)
                    log.info(f"{s.out.name} continues from epoch {first_epoch + 1}")
            datamodules: list[MNISTDataModule] = [s.job.datamodule for s in group]
            batches = ReplicaBatches(datamodules, device)
            log.info(f"Training {len(group)} jobs as one model: {', '.join(s.out.name for s in group)}")
            limits = _limit(first.cfg, "limit_train_batches"), _limit(first.cfg, "limit_val_batches")
            fit_replicas([s.job for s in group], replica, batches, first.cfg.trainer.max_epochs, *limits, first_epoch)
            replica.release()  # each job is tested and reported with a module of its own
            for s in group:
                s.replicas, s.steps = len(group), replica.steps

        try:
            work()
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # a crash or a stop signal: every job of the group ends with it, in its dir
            for s in group:
                s.error = err

    def _finish(self, cfg: DictConfig) -> float | None:
        out = Path(cfg.paths.output_dir)
        started = self.started.get(out)
        if not isinstance(started, _Started):
            return started  # finished before, or refused (said when it started)
        job = started.job

        def work() -> float | None:
            if started.error is not None:
                raise started.error
            if job.failure is not None:
                return failed(out, job.failure)
            best = job.best.best_model_path if job.best is not None else ""
            set_trainer_progress(job.trainer, len(job.history.epochs), started.steps)
            metrics = finish(cfg, job.trainer, job.module, job.datamodule, epochs=len(job.history.epochs),
                             train_seconds=training_seconds(job.trainer), best=best, started=started.started,
                             replicas=started.replicas)  # fmt: skip
            return metrics.get(cfg.get("optimized_metric"))

        try:
            return ended(out, work)
        finally:
            release_run_dir(out)
