"""Lightning DDP on the CPU (2 processes over gloo) through the same command a user runs."""

import csv

import lightning as L
import pytest
from helpers import epoch_rows, run_cli

from vae_lightning.data import MNISTDataModule
from vae_lightning.module import VAEModule


@pytest.mark.slow
def test_two_process_ddp_means_the_same_as_one_process(trained_run, mnist_dir, tmp_path):
    single_dir, _ = trained_run  # 1 process, batch 128
    ddp_dir = tmp_path / "ddp"
    result = run_cli(
        "vae_lightning.train", "trainer=ddp", "trainer.devices=2", "data.batch_size=64",  # 2 x 64 = 128 a step
        "trainer.max_epochs=1", "eval.k=2", "test=false",
        f"data.data_dir={mnist_dir}", f"hydra.run.dir={ddp_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr + result.stdout
    ddp, single = epoch_rows(ddp_dir), epoch_rows(single_dir)
    assert len(ddp) == 1  # written once, by rank 0
    # per-image epoch losses over all 60k images seen by both processes: the 1-process run's, within noise
    assert float(ddp[0]["train/loss"]) == pytest.approx(float(single[0]["train/loss"]), abs=2.5)
    assert float(ddp[0]["val/loss"]) == pytest.approx(float(single[0]["val/loss"]), abs=2.5)
    # val/* on 2 processes (each half the test set, synced) equals one process on all of it
    module = VAEModule.load_from_checkpoint(ddp_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    again = trainer.validate(module, datamodule=MNISTDataModule(str(mnist_dir)), verbose=False)[0]
    assert again["val/loss"] == pytest.approx(float(ddp[0]["val/loss"]), abs=0.3)
    assert len(list((ddp_dir / "tensorboard").glob("events.out.tfevents.*"))) >= 1
    assert not list(ddp_dir.glob("**/epochs*.csv"))[1:]  # no second copy from the other rank
    for name in ("samples.png", "loss_curves.png", "metrics.json", "checkpoints/last.ckpt"):
        assert (ddp_dir / name).exists(), name


@pytest.mark.slow
def test_a_multirun_whose_jobs_use_ddp(mnist_dir, tmp_path):
    """Lightning re-runs the command line for the other processes; in a sweep each job's children
    must run that job alone (not the sweep) and each job needs its own process group."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        "vae_lightning.train", "-m", "trainer=ddp", "trainer.devices=2", "model.latent_dim=2,4",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=20", "eval.k=2",
        f"data.data_dir={mnist_dir}", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 2  # one child per job
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert [r["overrides"] for r in rows] == ["model.latent_dim=2", "model.latent_dim=4"]
