"""python -m vae_lightning.eval end to end on a checkpoint from a short real-MNIST run."""

import json

import numpy as np
import pytest
from helpers import compose_config, run_cli
from PIL import Image

from vae_lightning.errors import UserError
from vae_lightning.eval import run
from vae_lightning.figures.plots import GRID_LEFT, GRID_TOP
from vae_lightning.training.checkpoints import find_checkpoint

KEYS = {"test/rec", "test/kl", "test/loss", "test/iw_nll", "test/active_units", "k", "latent_dim", "checkpoint", "note"}


def _cell(png: np.ndarray, row: int, column: int, scale: int = 3) -> np.ndarray:
    """One digit of a labelled grid figure, by its place in the grid."""
    top, left = GRID_TOP + scale * (2 + 30 * row), GRID_LEFT + scale * (2 + 30 * column)
    return png[top : top + 28 * scale, left : left + 28 * scale]


def _size(path):
    return Image.open(path).size


@pytest.mark.slow
def test_training_run_dir_has_metrics_and_figures(trained_run):
    run_dir, result = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert KEYS <= set(metrics) and metrics["k"] == 20
    assert metrics["checkpoint"].endswith(".ckpt")
    for name in ("reconstructions", "interpolations", "latent_scatter", "samples_100"):
        assert (run_dir / f"{name}.png").is_file(), name
    assert not (run_dir / "manifold.png").exists()  # latent_dim = 20
    assert "test/iw_nll" in result.stdout


@pytest.mark.slow
def test_eval_cli_on_a_run_dir(trained_run, mnist_dir, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "eval"
    result = run_cli(
        "vae_lightning.eval", f"ckpt_path={run_dir}", "eval.k=50", f"data.data_dir={mnist_dir}", f"hydra.run.dir={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert KEYS <= set(metrics)
    assert metrics["checkpoint"] == str(find_checkpoint(run_dir, "best"))
    assert metrics["k"] == 50 and metrics["latent_dim"] == 20
    # the same weights, the same test pass: the training run's own test numbers, exactly
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert [metrics[k] for k in ("test/loss", "test/rec", "test/kl")] == [
        trained[k] for k in ("test/loss", "test/rec", "test/kl")
    ]
    # the bound is tighter than the one-sample ELBO, and both are in the range a 3-epoch model reaches
    assert metrics["test/iw_nll"] < metrics["test/loss"]
    assert 90 < metrics["test/iw_nll"] < 120 and 95 < metrics["test/loss"] < 125
    assert metrics["test/loss"] == pytest.approx(metrics["test/rec"] + metrics["test/kl"])
    assert 1 <= metrics["test/active_units"] <= 20
    assert "binarized" in metrics["note"] and "binarized" in result.stdout
    # pixel sizes: 28-px digits, 2-px gutters, every pixel drawn 3 x 3
    cell = 30
    assert _size(out / "samples.png") == (3 * (10 * cell + 2), 3 * (cell + 2))
    assert _size(out / "samples_100.png") == (3 * (10 * cell + 2), 3 * (10 * cell + 2))
    # the labelled figures: the same grid drawn pixel for pixel, its top left corner at (GRID_LEFT, GRID_TOP)
    labelled_w, labelled_h = _size(out / "reconstructions.png")
    assert labelled_w > GRID_LEFT + 3 * (10 * cell + 2) and labelled_h > GRID_TOP + 3 * (4 * cell + 2)
    assert _size(out / "interpolations.png")[1] > GRID_TOP + 3 * (8 * cell + 2)
    assert _size(out / "latent_scatter.png")[0] > 600
    # a reconstruction resembles its digit: rows 1 and 2 of the grid (digit, reconstruction)
    png = np.asarray(Image.open(out / "reconstructions.png").convert("L"), dtype=float) / 255
    for column in range(10):
        digit, recon = (_cell(png, row, column) for row in (0, 1))
        other = _cell(png, 0, (column + 1) % 10)  # the next class's test image
        assert np.abs(digit - recon).mean() < min(0.12, np.abs(other - recon).mean()), column
    # the labels are drawn (text left of the rows, none of it over the digits)
    assert png[GRID_TOP : GRID_TOP + 3 * 30, : GRID_LEFT - 4].min() < 0.5
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_eval_manifold_for_a_2d_latent_space(mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    train = run_cli(
        "vae_lightning.train", "trainer.max_epochs=1", "model.latent_dim=2", "eval.k=5",
        f"data.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    width, height = _size(run_dir / "manifold.png")
    assert width > GRID_LEFT + 3 * (20 * 30 + 2) and height > GRID_TOP + 3 * (20 * 30 + 2)
    assert json.loads((run_dir / "metrics.json").read_text())["latent_dim"] == 2


def test_eval_without_a_checkpoint_says_so(tmp_path):
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(UserError) as err:
        run(compose_config("eval", tmp_path, f"ckpt_path={missing}"))
    assert str(err.value) == f"checkpoint {missing} does not exist; pass ckpt_path=<file.ckpt> or a training run dir"


@pytest.mark.slow
def test_eval_without_checkpoint_is_one_line_at_the_cli(tmp_path):
    result = run_cli("vae_lightning.eval", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    missing = tmp_path / "missing.ckpt"
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint {missing} does not exist; pass ckpt_path=<file.ckpt> or a training run dir"
    ]


def test_eval_device_is_checked_before_anything_loads():
    import torch

    from vae_lightning.eval import eval_device

    assert eval_device("cpu") == torch.device("cpu")
    assert eval_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="device=gpu7 is not a device; use auto, cpu, cuda or cuda:<n>"):
        eval_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device=cuda but this machine has no such CUDA GPU"):
            eval_device("cuda")


@pytest.mark.slow
def test_eval_with_k_0_gives_the_test_elbo_alone(trained_run, mnist_dir, tmp_path):
    run_dir, _ = trained_run
    result = run_cli("vae_lightning.eval", f"ckpt_path={run_dir}", "eval.k=0", f"data.data_dir={mnist_dir}",
                     f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"test/loss", "test/rec", "test/kl"} <= set(metrics) and "test/iw_nll" not in metrics
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/loss"] == pytest.approx(trained["test/loss"], abs=1e-4)  # one set of numbers
