"""What the program does when things go wrong: divergence (config, data and hardware errors are
tested beside the code they concern: test_configs.py, test_data.py)."""

import csv
import json
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from conftest import REPO, run_cli
from test_configs import compose_train

from vae_lightning.errors import DivergenceError
from vae_lightning.train import build_run


class PoisonAtEpoch(L.Callback):
    """Makes the weights infinite when epoch ``epoch`` (1-based) starts, as a blow-up would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            with torch.no_grad():
                pl_module.model.fc_logvar.bias.fill_(1e4)


@pytest.mark.slow
def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, mnist_dir):
    cfg = compose_train(
        tmp_path, f"data.data_dir={mnist_dir}", "trainer.max_epochs=3", "+trainer.limit_train_batches=30"
    )
    datamodule, module, trainer = build_run(cfg, extra_callbacks=[PoisonAtEpoch(2)])
    with pytest.raises(DivergenceError, match=r"at step 31, epoch 2; checkpoints/last.ckpt keeps epoch 1; try a"):
        trainer.fit(module, datamodule=datamodule)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    with (tmp_path / "epochs.csv").open() as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1"]
    assert (tmp_path / "loss_curves.png").is_file()


@pytest.mark.slow
def test_cli_divergence_is_one_line_and_a_sweep_goes_on(tmp_path, mnist_dir):
    single = run_cli(
        "vae_lightning.train", "model.lr=10", "trainer.max_epochs=1",
        f"data.data_dir={mnist_dir}", f"hydra.run.dir={tmp_path / 'single'}",
    )  # fmt: skip
    assert single.returncode == 1 and "Traceback" not in single.stderr
    last_line = single.stderr.strip().splitlines()[-1]
    assert (
        last_line.startswith("error: training diverged: the per-image loss became") and "model.lr (now 10" in last_line
    )
    status = json.loads((tmp_path / "single" / "metrics.json").read_text())["status"]
    assert status.startswith("failed: training diverged")

    sweep = tmp_path / "sweep"
    result = run_cli(
        "vae_lightning.train", "-m", "model.lr=10,1e-3", "trainer.max_epochs=1", "+trainer.limit_train_batches=150",
        "eval.k=2", f"data.data_dir={mnist_dir}", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["status"].startswith("failed: training diverged")
    assert rows[1]["status"] == "completed" and float(rows[1]["val/loss"]) < 200


@pytest.mark.slow
def test_a_run_killed_mid_epoch_and_resumed_equals_an_uninterrupted_one(tmp_path, mnist_dir):
    common = ["+trainer.limit_train_batches=100", "eval.k=0", "test=false", f"data.data_dir={mnist_dir}"]
    common += ["trainer.max_epochs=3"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = run_cli("vae_lightning.train", *common, f"hydra.run.dir={straight}")
    assert result.returncode == 0, result.stderr[-3000:]

    proc = subprocess.Popen(
        [sys.executable, "-m", "vae_lightning.train", *common, f"hydra.run.dir={killed}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (killed / "epochs.csv").is_file() or len((killed / "epochs.csv").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len((killed / "epochs.csv").read_text().splitlines()) == 2  # killed during epoch 2

    resumed = run_cli("vae_lightning.train", *common, f"ckpt_path={killed}", f"hydra.run.dir={tmp_path / 'new'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Continuing the run in {killed}" in resumed.stdout
    # the same data order and the same noise: bit-identical on the CPU, in the same run dir
    assert (killed / "epochs.csv").read_text() == (straight / "epochs.csv").read_text()
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    history = [v for k, v in b["callbacks"].items() if "TrainingHistory" in k][0]
    assert len(history["steps"]) == 300  # the curves cover all three epochs


def test_resume_from_nothing_is_one_clear_error(tmp_path):
    result = run_cli(
        "vae_lightning.train", "ckpt_path=last", f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path}/r"
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: ckpt_path=last but no run in {tmp_path}/train/runs has checkpoints/last.ckpt"
    ]
