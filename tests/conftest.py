import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from filelock import FileLock
from helpers import TRAINED_EPOCHS, run_cli

from vae_lightning.data.datasets import default_data_dir, ensure_dataset
from vae_lightning.errors import DataError


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Real MNIST: $VAE_DATA_DIR or the repo's data/ (downloaded if missing). Its files' sizes are
    checked here; their checksums by the tests of the data checks and by every CLI run.

    Skips where MNIST cannot be had, except under CI, where that is a failure."""
    data_dir = default_data_dir()
    try:
        ensure_dataset(data_dir, download=True, verify_checksums=False)
    except DataError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"real MNIST unavailable: {err}")
    return data_dir.resolve()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, mnist_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """One real 3-epoch training run through the CLI, shared by the tests that read its outputs (and,
    under pytest-xdist, by every worker: the first to ask trains, the others wait and read it)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the workers' common folder
    run_dir, record = shared / "trained_run", shared / "trained_run.json"
    with FileLock(f"{record}.lock"):
        if not record.is_file():
            result = run_cli(
                "vae_lightning.train",
                f"trainer.max_epochs={TRAINED_EPOCHS}",
                f"data.data_dir={mnist_dir}",
                f"hydra.run.dir={run_dir}",
                "eval.k=20",
            )
            record.write_text(json.dumps([result.args, result.returncode, result.stdout, result.stderr]))
        result = subprocess.CompletedProcess(*json.loads(record.read_text()))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# as the machine's own browser probe starts it: no sandbox (root), and no background traffic
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing under CI: .ci/run installs Debian's chromium")
        pytest.skip("no Chromium here (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
