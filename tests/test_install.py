"""The package as users get it: the wheel installed non-editable into a fresh venv, used from an
empty directory by its console scripts and by ``python -m``; and the example plugin package
(examples/vae_resnet) installed beside it, whose parts train, evaluate, report and export from the
command line, and whose checkpoints are refused in one line where the plugin is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from filelock import FileLock
from helpers import REPO, run_cli, run_in_one_interpreter

pytestmark = pytest.mark.slow
FEW_STEPS = ["trainer.max_epochs=1", "+trainer.limit_train_batches=5", "+trainer.limit_val_batches=2", "eval.k=2",
             "eval.batch_size=500"]  # fmt: skip


def _run(*args: str | Path, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def installed(tmp_path_factory, mnist_dir) -> Path:
    """A venv holding the vae_lightning wheel and the example plugin's, installed non-editable. Its
    dependencies are the test venv's own, reached by a .pth file (no download, and none of the
    test venv's editable install of this checkout: a .pth file's .pth files are not read)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    venv, done = shared / "installed_venv", shared / "installed_venv.done"
    with FileLock(f"{done}.lock"):
        if not done.is_file():
            wheels = shared / "wheels"
            for project in (REPO, REPO / "examples" / "vae_resnet"):
                built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", wheels, project, cwd=shared)  # fmt: skip
                assert built.returncode == 0, built.stderr[-2000:]
            made = _run(sys.executable, "-m", "venv", "--without-pip", venv)
            assert made.returncode == 0, made.stderr
            python = venv / "bin" / "python"
            site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
            (Path(site) / "test_venv_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
            pip = _run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", *sorted(wheels.glob("*.whl")))
            assert pip.returncode == 0, pip.stderr[-2000:]
            done.touch()
    return venv


def _env(mnist_dir: Path) -> dict[str, str]:
    return {**os.environ, "VAE_DATA_DIR": str(mnist_dir)}


def test_the_installed_wheel_trains_evaluates_and_exports_from_an_empty_directory(installed, mnist_dir, tmp_path):
    python = installed / "bin" / "python"
    where = _run(python, "-c", "import vae_lightning.conf as c; print(c.__file__)", cwd=tmp_path)
    assert str(installed) in where.stdout and str(REPO) not in where.stdout, where  # the wheel's, not this checkout
    trained = _run(installed / "bin" / "vae-train", *FEW_STEPS, cwd=tmp_path, env=_env(mnist_dir))
    assert trained.returncode == 0, trained.stderr[-3000:]
    runs = sorted((tmp_path / "logs" / "train" / "runs").iterdir())  # ./logs of the directory it ran in
    assert len(runs) == 1 and (runs[0] / "epochs.csv").is_file() and (runs[0] / "report.html").is_file()
    results = run_in_one_interpreter(
        [
            ["python", "-m", "vae_lightning.train", *FEW_STEPS, "model.latent_dim=4"],
            ["python", "-m", "vae_lightning.eval", f"ckpt_path={runs[0]}", "eval.k=2", "hydra.run.dir=evaluated"],
            ["python", "-m", "vae_lightning.export", f"ckpt_path={runs[0]}", "format=safetensors", "hydra.run.dir=out"],
        ],
        cwd=tmp_path, env=_env(mnist_dir), python=str(python),
    )  # fmt: skip
    assert [code for code, _, _ in results] == [0, 0, 0], [err[-2000:] for _, _, err in results]
    assert len(list((tmp_path / "logs" / "train" / "runs").iterdir())) == 2
    assert "test/iw_nll" in json.loads((tmp_path / "evaluated" / "metrics.json").read_text())
    assert (tmp_path / "out" / "decoder.safetensors").is_file()
    assert not (REPO / "logs" / "train" / "runs").exists() or not any(
        str(tmp_path) in p.read_text() for p in (REPO / "logs").rglob("overrides.yaml")
    )


def test_a_plugins_parts_train_report_and_export_and_its_checkpoint_is_refused_without_it(
    installed, mnist_dir, tmp_path, browser
):
    python = str(installed / "bin" / "python")
    plugin = ["model/net=resconv", "model.likelihood=laplace", "model.net.channels=[8,16]"]
    results = run_in_one_interpreter(
        [
            ["python", "-m", "vae_lightning.train", *FEW_STEPS, *plugin, "hydra.run.dir=run"],
            ["python", "-m", "vae_lightning.report", "ckpt_path=run", "hydra.run.dir=reported"],
            ["python", "-m", "vae_lightning.export", "ckpt_path=run", "format=onnx", "hydra.run.dir=onnx"],
            ["python", "-m", "vae_lightning.export", "ckpt_path=run", "format=torchscript", "hydra.run.dir=ts"],
        ],
        cwd=tmp_path, env=_env(mnist_dir), python=python,
    )  # fmt: skip
    assert [code for code, _, _ in results] == [0, 0, 0, 0], [err[-2000:] for _, _, err in results]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "the real line per pixel" in metrics["note"]  # the plugin likelihood's own support
    assert (tmp_path / "onnx" / "decoder.onnx").is_file() and (tmp_path / "ts" / "decoder.pt").is_file()

    # the page runs the plugin's residual decoder itself (save and add_saved ops): no refusal, and a drawn image
    page = browser.new_page()
    page.goto((tmp_path / "run" / "report.html").as_uri())
    assert page.locator("#decoder-error").inner_text() == ""
    page.locator("#test-0").click()
    drawn = page.evaluate("Array.from(pixels)")
    assert len(drawn) == 784 and max(drawn) > 0.3 and min(drawn) >= 0
    page.screenshot(path=str(tmp_path / "plugin_report.png"))
    page.close()

    # where the plugin is not installed (this test venv), its checkpoint is refused in one line
    refused = run_cli("vae_lightning.eval", f"ckpt_path={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'r'}")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(lines) == 1, refused.stderr[-2000:]
    assert "'laplace'" in lines[0] and "no installed package provides" in lines[0]
