"""A callback that fails on purpose, for tests that start the CLI with
``+callbacks.crash._target_=faulty_callbacks.RaiseAtEpochEnd`` (tests/ on PYTHONPATH)."""

import os
import signal
import subprocess

import lightning as L


class RaiseAtEpochEnd(L.Callback):
    """Raises at the end of epoch ``epoch`` (1-based), before that epoch's checkpoints are saved."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            raise RuntimeError(f"a callback failed at the end of epoch {self.epoch}")


class PoisonOnRank(L.Callback):
    """Makes the weights of process ``rank`` infinite just before step ``step`` (1-based), as a
    blow-up on one process only would: the other processes see it a step later, if at all."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step + 1 == self.step:
            pl_module.model.encoder.fc_logvar.bias.data.fill_(1e4)


class RaiseInTest(L.Callback):
    """Raises when the test pass ends, after training finished."""

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise RuntimeError("a callback failed in the test pass")


class KillAtStep(L.Callback):
    """SIGKILLs its own process just before step ``step`` (1-based): a kill at a known point."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillInTest(L.Callback):
    """SIGKILLs its own process in the test pass, after training finished."""

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == 1:
            os.kill(os.getpid(), signal.SIGKILL)


class SlurmStops(L.Callback):
    """Slurm stopping a job (under tests/fake_slurm) just before a known step, once per start of the
    job: ``stops[i]`` is what happens in the job's start number i (``SLURM_RESTART_COUNT``), at step
    ``steps[i]`` (1-based). ``time_limit``: the signal submitit asked Slurm for (USR2), as Slurm sends
    it ``signal_delay_s`` before the time limit. ``preempt``: Slurm requeues the job and sends it
    SIGTERM, as a pre-emption in PreemptMode=REQUEUE does. ``term_then_usr2``: SIGTERM and then
    the job's signal, as Slurm pre-empts a job that asked for a signal (and as submitit's own test
    helper does), with nobody but submitit to requeue it."""

    def __init__(self, stops: list[str], steps: list[int]) -> None:
        self.stops, self.steps = list(stops), list(steps)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        start = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if start >= len(self.stops) or trainer.global_step + 1 != self.steps[start]:
            return
        if self.stops[start] == "time_limit":
            os.kill(os.getpid(), signal.SIGUSR2)
        elif self.stops[start] == "cancel":  # the user's scancel
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            subprocess.run(["scancel", job], check=True)
        elif self.stops[start] == "term_then_usr2":
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR2)
        else:
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            subprocess.run(["scontrol", "requeue", job], check=True)
