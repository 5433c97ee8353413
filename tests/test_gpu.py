"""What only a GPU can show. Run on a machine with CUDA: ``pytest -m gpu`` (docs/clusters.md).
Here (no GPU) they are collected and skipped with the reason."""

import lightning as L
import pytest
import torch
from helpers import SHORT, compose_train, epoch_rows, kill_early_in_epoch_2, run_cli, same_weights

from vae_lightning.runs.building import build_run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]
TWO_EPOCHS = ["trainer.max_epochs=2", "+trainer.limit_train_batches=200", "eval.k=2", "test=false"]


def train(run_dir, mnist_dir, *overrides):
    result = run_cli(
        "vae_lightning.train", *TWO_EPOCHS, f"data.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}", *overrides
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return epoch_rows(run_dir)


def test_a_run_on_cuda_matches_the_cpu_run_within_noise(mnist_dir, tmp_path):
    gpu = train(tmp_path / "gpu", mnist_dir, "trainer=gpu")
    cpu = train(tmp_path / "cpu", mnist_dir, "trainer=cpu")
    for a, b in zip(gpu, cpu, strict=True):
        assert float(a["train/loss"]) == pytest.approx(float(b["train/loss"]), abs=2.5)
        assert float(a["val/loss"]) == pytest.approx(float(b["val/loss"]), abs=2.5)


class DeviceOfTheEvaluation(L.Callback):
    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.device = pl_module.device


def test_the_end_of_run_evaluation_runs_on_the_gpu(mnist_dir, tmp_path):
    cfg = compose_train(tmp_path, "trainer=gpu", "trainer.max_epochs=1", "+trainer.limit_train_batches=20", "eval.k=5",
                        f"data.data_dir={mnist_dir}")  # fmt: skip
    probe = DeviceOfTheEvaluation()
    datamodule, module, trainer = build_run(cfg, extra_callbacks=[probe])
    trainer.fit(module, datamodule=datamodule)
    results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    assert probe.device.type == "cuda" and "test/iw_nll" in results


def test_kill_and_resume_on_one_gpu_reproduces_an_uninterrupted_run(mnist_dir, tmp_path):
    common = ["trainer=gpu", *SHORT, "trainer.max_epochs=3", f"data.data_dir={mnist_dir}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli("vae_lightning.train", *common, f"hydra.run.dir={straight}").returncode == 0
    kill_early_in_epoch_2([*common, f"hydra.run.dir={killed}"], killed / "epochs.csv")
    assert run_cli("vae_lightning.train", *common, f"ckpt_path={killed}").returncode == 0
    assert (killed / "epochs.csv").read_text() == (straight / "epochs.csv").read_text()
    assert same_weights(straight / "checkpoints" / "last.ckpt", killed / "checkpoints" / "last.ckpt")


def test_bf16_mixed_lands_near_fp32(mnist_dir, tmp_path):
    fp32 = train(tmp_path / "fp32", mnist_dir, "trainer=gpu")
    bf16 = train(tmp_path / "bf16", mnist_dir, "trainer=gpu", "trainer.precision=bf16-mixed")
    assert float(bf16[-1]["train/loss"]) == pytest.approx(float(fp32[-1]["train/loss"]), abs=0.5)


def test_seeds_as_replicas_on_the_gpu_match_their_runs_alone(mnist_dir, tmp_path):
    """hydra/launcher=replicas on CUDA: each replica draws from a copy of its job's CUDA generator
    (noise, dynamic binarization), so its epochs.csv is its job's alone on the GPU, up to the
    reduction order of batched GEMMs."""
    common = ["-m", "trainer=gpu", "seed=0,1", "data.binarize=dynamic", *TWO_EPOCHS, f"data.data_dir={mnist_dir}"]
    alone, replicas = tmp_path / "alone", tmp_path / "replicas"
    assert run_cli("vae_lightning.train", *common, f"hydra.sweep.dir={alone}").returncode == 0
    done = run_cli("vae_lightning.train", *common, "hydra/launcher=replicas", f"hydra.sweep.dir={replicas}")
    assert done.returncode == 0, done.stderr[-3000:]
    for job in ("0", "1"):
        for ours, theirs in zip(epoch_rows(replicas / job), epoch_rows(alone / job), strict=True):
            assert float(ours["train/loss"]) == pytest.approx(float(theirs["train/loss"]), abs=0.05)
            assert float(ours["val/loss"]) == pytest.approx(float(theirs["val/loss"]), abs=0.05)
