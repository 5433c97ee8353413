"""A callback that fails on purpose, for tests that start the CLI with
``+callbacks.crash._target_=faulty_callbacks.RaiseAtEpochEnd`` (tests/ on PYTHONPATH)."""

import os
import signal

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
