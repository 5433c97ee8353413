"""What several optimizer steps per Lightning batch would save: the project's path (b) as it is
(automatic optimization, one step per batch) against the same objects with manual optimization
over blocks of K batches of 128 (K = 1, 4, 8; the same images in the same order, every step's
values still logged), and the bare loop (d), per epoch, interleaved, medians.

    python benchmarks/steps_per_batch.py [--rounds 2]

An experiment, not a setting of the project: docs/performance.md says why the project keeps one
optimizer step per Lightning batch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from epoch_speed import EpochTimer, bare_loop_epochs
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vae_lightning.data.datasets import default_data_dir, ensure_dataset
from vae_lightning.runs.building import build_run
from vae_lightning.training.callbacks import TrainingHistory
from vae_lightning.training.module import VAEModule

REPO_CONF = str(Path(__file__).resolve().parents[1] / "conf")
BATCH = 128


class BlockModule(VAEModule):
    """The project's module stepping once per 128 images of each (K x 128)-image batch."""

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.automatic_optimization = False

    def training_step(self, block: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        optimizer = self.optimizers()
        steps = []
        for x in block.split(BATCH):
            out = self._shared_step(x, "train")
            optimizer.zero_grad()
            self.manual_backward(out["graph_loss"])
            optimizer.step()
            steps.append(torch.stack([out["rec"], out["kl"], out["loss"]]))
        return {"steps": torch.stack(steps)}


class BlockHistory(TrainingHistory):
    """TrainingHistory for blocks: each optimizer step's values at its own step number."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps = outputs["steps"]
        self._pending.extend(steps)
        self._pending_steps.extend(range(trainer.global_step - len(steps), trainer.global_step))
        if len(self._pending) >= self.flush_every:
            self._flush_steps(trainer)


def epoch_seconds(data_dir: Path, steps_per_batch: int | None) -> float:
    """One epoch of (b), validation included; ``None``: as the project runs it."""
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(REPO_CONF, version_base="1.3"):
        overrides = [f"paths.output_dir={out}", f"data.data_dir={data_dir}", "trainer.max_epochs=1", "test=false"]
        cfg = compose("train", overrides=[*overrides, "trainer.accelerator=cpu"])
        if steps_per_batch:
            cfg.callbacks.training_history._target_ = f"{__name__}.BlockHistory"
        OmegaConf.resolve(cfg)
        timer = EpochTimer()
        datamodule, module, trainer = build_run(cfg, extra_callbacks=[timer])
        if steps_per_batch:
            module = BlockModule(**module.hparams)
            datamodule.batch_size = BATCH * steps_per_batch
        trainer.fit(module, datamodule=datamodule)
    return timer.times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    data_dir = default_data_dir()
    ensure_dataset(data_dir, download=True)
    candidates = {"(b) automatic, 1 step per batch": None, **{f"manual, {k} steps per batch": k for k in (1, 4, 8)}}
    times: dict[str, list[float]] = {name: [] for name in [*candidates, "(d) bare loop"]}
    for _ in range(args.rounds):
        for name, k in candidates.items():
            times[name].append(epoch_seconds(data_dir, k))
        times["(d) bare loop"] += bare_loop_epochs(data_dir, 1, torch.device("cpu"))
    bare = statistics.median(times["(d) bare loop"])
    print(f"\n{torch.get_num_threads()} threads, {args.rounds} rounds; seconds per epoch (median), and over (d):")
    for name, values in times.items():
        print(f"  {name:36s} {statistics.median(values):6.2f}  {statistics.median(values) / bare:5.2f}x")


if __name__ == "__main__":
    main()
