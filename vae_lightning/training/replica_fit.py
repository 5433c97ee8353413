"""The training loop of jobs trained as one model (``replicas``), each job writing what its
Lightning run writes alone: per-step values to its loggers, ``epochs.csv`` and epoch metrics every
epoch, its best (by val/loss) and last checkpoints, the sample grid, and the loss curves.

Hand-written because Lightning's loop drives one module: here one step serves every job, and
each job's files come from its own callbacks' writers (``TrainingHistory``, ``SampleGrid``), its
checkpoint callbacks' state and its trainer's checkpoint IO, as ``runs.building.build_run`` built them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vae_lightning.data.datamodule import MNISTDataModule
from vae_lightning.data.replica_batches import ReplicaBatches
from vae_lightning.model.objectives import Progress
from vae_lightning.training import stopping
from vae_lightning.training.callbacks import SampleGrid, TrainingHistory, diverged
from vae_lightning.training.module import VAEModule, saved_generator_states
from vae_lightning.training.replicas import REPLICA_KEY, EpochSums, ReplicaGroup


@dataclass
class ReplicaJob:
    """One job of a group: the parts ``build_run`` made for it, and how its training ended."""

    trainer: L.Trainer
    module: VAEModule
    datamodule: MNISTDataModule
    failure: str | None = None  # the one line its training ended on, if it diverged

    def callback(self, kind: type) -> Any:
        return next((cb for cb in self.trainer.callbacks if isinstance(cb, kind)), None)

    @property
    def history(self) -> TrainingHistory:
        return self.callback(TrainingHistory)

    @property
    def best(self) -> ModelCheckpoint | None:
        return self.trainer.checkpoint_callback  # the first ModelCheckpoint: the best by val/loss

    @property
    def last(self) -> ModelCheckpoint | None:
        return next((cb for cb in self.trainer.checkpoint_callbacks if cb is not self.best), None)

    def restore(self, checkpoint: dict[str, Any], replica: ReplicaGroup, index: int) -> None:
        """Continue from ``checkpoint`` (this job's last, from a replica sweep or a job alone):
        weights, Adam, its generator's state, its callbacks' (history, best checkpoint, clock)."""
        self.module.load_state_dict(checkpoint["state_dict"])  # into its row of the stacked weights
        replica.load_optimizer_state(index, checkpoint["optimizer_states"][0])
        generator = replica.noise.generators[index]
        state = checkpoint.get(REPLICA_KEY)
        if state is None:  # a job alone's: its global generator's state
            saved = saved_generator_states(checkpoint["rng_states"])[0]
            state = saved["cuda"] if generator.device.type == "cuda" else saved["torch"]
        generator.set_state(state)
        states = checkpoint.get("callbacks", {})
        for callback in self.trainer.callbacks:
            if callback.state_key in states:
                callback.load_state_dict(states[callback.state_key])

    @property
    def timer(self) -> Timer:
        return self.callback(Timer)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step)

    def checkpoint(self, epoch: int, step: int, replica: ReplicaGroup, index: int) -> dict[str, Any]:
        """What Lightning's checkpoint of this job would hold after ``epoch`` (0-based): weights,
        settings, Adam, data protocol, callbacks' state; and the replica's own generator."""
        callbacks = {cb.state_key: cb.state_dict() for cb in self.trainer.callbacks if cb.state_dict()}
        return {
            "epoch": epoch,
            "global_step": step,
            "pytorch-lightning_version": L.__version__,
            "state_dict": {
                k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in self.module.state_dict().items()
            },  # fmt: skip
            "callbacks": callbacks,
            "optimizer_states": [replica.optimizer_state(index)],
            "lr_schedulers": [],
            "hparams_name": "kwargs",
            "hyper_parameters": dict(self.module.hparams),
            type(self.datamodule).__qualname__: self.datamodule.state_dict(),
            REPLICA_KEY: replica.noise.generators[index].get_state(),
        }

    def save(self, callback: ModelCheckpoint, path: Path, checkpoint: dict[str, Any], score: float | None) -> None:
        """Write ``checkpoint`` to ``path`` as ``callback`` would, keeping its state (the file it
        keeps, its score) as Lightning's does; the file it kept before goes."""
        before = callback.best_model_path
        callback.best_model_path = callback.kth_best_model_path = callback.last_model_path = str(path)
        if score is not None:
            callback.best_model_score = callback.kth_value = callback.current_score = torch.tensor(score)
            callback.best_k_models = {str(path): torch.tensor(score)}
        checkpoint["callbacks"][callback.state_key] = callback.state_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
        if before and before != str(path):
            Path(before).unlink(missing_ok=True)


def _end_epoch(
    job: ReplicaJob, replica: ReplicaGroup, index: int, row: dict[str, float], epoch: int, step: int, seconds: float
) -> None:
    """Epoch ``epoch``'s row, metrics, checkpoints and sample grid for one live job, whose training
    has taken ``seconds`` over all its sittings (kept by its Timer, which rides in its checkpoints)."""
    if job.timer is not None:
        job.timer.load_state_dict({"time_elapsed": {"train": seconds}})
    what = TrainingHistory.epoch_divergence(row.get("val/loss"), job.module.parameters(), epoch)
    if what is not None:
        _diverged(job, replica, index, what, epoch)
        return
    job.history.record_epoch(row)
    job.history.write_csv()
    job.log({**{k: v for k, v in row.items() if k != "epoch"}, "epoch": epoch}, step - 1)
    checkpoint = job.checkpoint(epoch, step, replica, index)
    best = job.best
    if best is not None and best.dirpath and row["val/loss"] < float(best.best_model_score or math.inf):
        job.save(best, Path(best.dirpath) / f"epoch_{epoch + 1:03d}.ckpt", checkpoint, row["val/loss"])
    if (last := job.last) is not None and last.dirpath:
        job.save(last, Path(last.dirpath) / "last.ckpt", checkpoint, None)
    if (grid := job.callback(SampleGrid)) is not None:
        grid.log_epoch(job.trainer.loggers, job.module.model, step)


def fit_replicas(
    jobs: list[ReplicaJob],
    replica: ReplicaGroup,
    batches: ReplicaBatches,
    epochs: int,
    limit_train_batches: int | None = None,
    limit_val_batches: int | None = None,
    first_epoch: int = 0,
) -> None:
    """Train every job of ``replica`` from ``first_epoch`` (0-based; the jobs' checkpoints restored)
    to ``epochs``; each job's files as its Lightning run writes them. A job that diverges stops
    alone (``job.failure``)."""
    started = time.perf_counter()
    before = [job.timer.time_elapsed("train") if job.timer is not None else 0.0 for job in jobs]
    for job in jobs:
        job.history.setup(job.trainer, job.module, "fit")
    terms, objective = jobs[0].history.step_terms, jobs[0].module.objective
    steps_per_epoch = min(batches.train_steps(), limit_train_batches or batches.train_steps())
    step = replica.steps
    for epoch in range(first_epoch, epochs):
        epoch_started = time.perf_counter()
        train, pending, pending_steps = EpochSums(), [], []
        for x in batches.train(epoch, replica.noise.generators, limit_train_batches):
            progress = Progress(step, steps_per_epoch)
            values = replica.train_step(x, progress)
            train.add(values)
            pending.append(torch.stack([values[t].detach().float().mean(1) for t in terms], 1))  # (jobs, terms)
            pending_steps.append(step)
            if schedule := objective.step_logs(progress):  # a schedule (the KL's warm-up), the same for every job
                for index, job in enumerate(jobs):
                    if replica.alive[index]:
                        job.log(schedule, step)
            step += 1
            if len(pending) >= jobs[0].history.flush_every:
                _flush(jobs, replica, pending, pending_steps, epoch)
                pending, pending_steps = [], []
            if stopping.stop_signal() is not None:  # as StopOnSignal: every job keeps its last epoch
                raise SIGTERMException
        _flush(jobs, replica, pending, pending_steps, epoch)
        val = EpochSums()
        for x, x_dim in batches.evaluate(limit=limit_val_batches):
            val.add(replica.eval_step(x, x_dim))
        rows = [{"epoch": epoch + 1} for _ in jobs]
        for stage, sums in (("train", train), ("val", val)):
            for term, values in sums.means().items():
                for row, value in zip(rows, values, strict=True):
                    row[f"{stage}/{term}"] = value
        elapsed = time.perf_counter() - started
        for index, (job, row) in enumerate(zip(jobs, rows, strict=True)):
            if replica.alive[index]:
                _end_epoch(job, replica, index, row, epoch, step, before[index] + elapsed)
        _progress_line(epoch, epochs, time.perf_counter() - epoch_started, rows, replica.alive)
        if not any(replica.alive):
            break
    for job, alive in zip(jobs, replica.alive, strict=True):
        if alive:
            job.history.write_plot()
            if (grid := job.callback(SampleGrid)) is not None:
                grid.write(job.module.model)


def _flush(jobs: list[ReplicaJob], replica: ReplicaGroup, pending: list, steps: list[int], epoch: int) -> None:
    if not pending:
        return
    block = torch.stack(pending).cpu()  # (steps, jobs, terms): one host sync for every job
    step_numbers = torch.tensor(steps, dtype=torch.long)
    for index, job in enumerate(jobs):
        if not replica.alive[index]:
            continue
        values = block[:, index]
        job.history.record_steps(values, step_numbers, job.trainer.loggers)
        if (what := TrainingHistory.divergence(values, step_numbers, epoch)) is not None:
            _diverged(job, replica, index, what, epoch)


def _diverged(job: ReplicaJob, replica: ReplicaGroup, index: int, what: str, epoch: int) -> None:
    """The replica stops stepping; its job ends on the line a job alone ends on (``epoch`` finished epochs)."""
    job.failure = str(diverged(what, job.module.hparams.get("lr", "?"), epoch))
    replica.alive[index] = False


def _progress_line(epoch: int, epochs: int, seconds: float, rows: list[dict[str, float]], alive: list[bool]) -> None:
    losses = " ".join(f"{row['train/loss']:.2f}" if ok else "diverged" for row, ok in zip(rows, alive, strict=True))
    print(f"epoch {epoch + 1}/{epochs}  {seconds:.1f} s  {len(rows)} replicas  train/loss {losses}", flush=True)
