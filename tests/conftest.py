import os
import subprocess
import sys
from pathlib import Path

import pytest

from vae_lightning.data import default_data_dir, ensure_mnist
from vae_lightning.errors import DataError

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Real MNIST: $VAE_DATA_DIR or the repo's data/ (downloaded if missing).

    Skips where MNIST cannot be had, except under CI, where that is a failure."""
    data_dir = default_data_dir()
    try:
        ensure_mnist(data_dir, download=True)
    except DataError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"real MNIST unavailable: {err}")
    return data_dir.resolve()


def run_cli(module: str, *overrides: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <overrides>`` as a user would; capture its output."""
    return subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )


TRAINED_EPOCHS = 3


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, mnist_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """One real 3-epoch training run through the CLI, shared by the tests that read its outputs."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run_cli(
        "vae_lightning.train",
        f"trainer.max_epochs={TRAINED_EPOCHS}",
        f"data.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
        "eval.k=20",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result
