"""A callback that fails on purpose, for tests that start the CLI with
``+callbacks.crash._target_=faulty_callbacks.RaiseAtEpochEnd`` (tests/ on PYTHONPATH)."""

import lightning as L


class RaiseAtEpochEnd(L.Callback):
    """Raises at the end of epoch ``epoch`` (1-based), before that epoch's checkpoints are saved."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            raise RuntimeError(f"a callback failed at the end of epoch {self.epoch}")
