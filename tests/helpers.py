"""Helpers shared by the tests: running the CLI, composing configs, reading what a run wrote."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vae_lightning.training.checkpoints import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
TRAINED_EPOCHS = 3  # the shared real run of conftest.trained_run
# a short run: 100 steps an epoch, no test pass
SHORT = ["+trainer.limit_train_batches=100", "eval.k=0", "test=false", "trainer.max_epochs=2"]

__all__ = ["load_checkpoint"]


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


# Runs commands one after the other in one interpreter, each as ``python -m`` runs it (runpy, with
# its argv), so that torch and Lightning are imported once, not once a command (9 s each here).
# A command's exit code and output are framed by the markers. <run> is the first run under
# logs/train/runs (a command naming a run that an earlier command made).
_DRIVER = """
import json, runpy, sys
from pathlib import Path
from hydra.core.global_hydra import GlobalHydra
for words in json.loads(sys.argv[1]):
    if any("<run>" in w for w in words):
        words = [w.replace("<run>", sorted(Path("logs/train/runs").iterdir())[0].name) for w in words]
    print("@@ start", json.dumps(words), flush=True)
    print("@@ start", file=sys.stderr, flush=True)
    sys.argv = [words[2], *words[3:]]
    try:
        runpy.run_module(words[2], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    GlobalHydra.instance().clear()
    print("@@ exit", code, flush=True)
"""


def run_in_one_interpreter(
    commands: list[list[str]], cwd: Path = REPO, env: dict | None = None, python: str = sys.executable
) -> list[tuple[int, str, str]]:
    """``python -m <module> <overrides>`` commands (each a list of words, ``python -m`` first), run
    in one interpreter; each one's (exit code, stdout, stderr), for as many as ran."""
    result = subprocess.run(
        [python, "-c", _DRIVER, json.dumps(commands)], cwd=cwd, env=env, capture_output=True, text=True, timeout=1500
    )
    outputs, errors = result.stdout.split("@@ start ")[1:], result.stderr.split("@@ start")[1:]
    return [
        (int(out.rsplit("@@ exit ", 1)[1].split()[0]) if "@@ exit " in out else -1, out, err)
        for out, err in zip(outputs, errors, strict=False)
    ]


def compose_config(name: str, output_dir: Path, *overrides: str) -> DictConfig:
    """``conf/<name>.yaml`` composed in-process as the CLI would, writing into ``output_dir``."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        # paths.log_dir: where logger=mlflow keeps its store; a test's own, never the repo's logs/
        cfg = compose(name, overrides=[f"paths.output_dir={output_dir}", f"paths.log_dir={output_dir}", *overrides])
    OmegaConf.resolve(cfg)
    return cfg


def compose_train(output_dir: Path, *overrides: str) -> DictConfig:
    return compose_config("train", output_dir, *overrides)


def epochs_column(csv_path: Path) -> list[str]:
    with csv_path.open() as f:
        return [row["epoch"] for row in csv.DictReader(f)]


def epoch_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "epochs.csv").open() as f:
        return list(csv.DictReader(f))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[key], wb[key]) for key in wa)


def read_scalars(run_dir: Path) -> tuple[dict[str, list], list[str]]:
    """Every scalar event (by tag) and every image tag in a run's TensorBoard files."""
    scalars: dict[str, list] = {}
    images: list[str] = []
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
        images += acc.Tags()["images"]
    return scalars, images


def kill_early_in_epoch_2(args: list[str], csv_path: Path) -> None:
    """Start ``python -m vae_lightning.train <args>``; SIGKILL it just after ``csv_path`` (the
    killed run's epochs.csv) records epoch 1, so the kill lands in epoch 2."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vae_lightning.train", *args],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_until(lambda: csv_path.is_file() and len(csv_path.read_text().splitlines()) >= 2, proc, "epoch 1 ended")
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    """Poll a running CLI process until ``ready()``; fail if it ends (or times out) first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, f"the run ended before {what}"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(kind: str, rank: int, port: int) -> dict[str, str]:
    """What a launcher sets for process ``rank`` of a 2-node job with one process per node:
    ``env`` is Lightning's own multi-node variables, ``slurm`` those of a 2-task Slurm job. Each
    "node" gets one of this machine's cores, as a real node has its own."""
    threads = {"OMP_NUM_THREADS": "1"}
    if kind == "env":
        return {**threads, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank)}
    return {
        **threads,
        "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_NODEID": str(rank),
        "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "vae",
        "SLURM_NODELIST": "localhost", "MASTER_PORT": str(port),
    }  # fmt: skip


def start_two_nodes(kind: str, *overrides: str) -> list[subprocess.Popen]:
    """``python -m vae_lightning.train trainer=ddp trainer.devices=1 trainer.num_nodes=2 <overrides>``
    as two "nodes" on the loopback, one process each."""
    port = free_port()
    args = ["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2", *overrides]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "vae_lightning.train", *args],
            cwd=REPO,
            env={**os.environ, **node_env(kind, rank, port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    """Each process's exit code and stderr once all have ended."""
    return [(proc.wait(timeout), proc.communicate()[1]) for proc in procs]


def brief_run(run_dir: Path, mnist_dir: Path, *overrides: str, batches: int = 30) -> dict:
    """A 1-epoch CLI run of ``batches`` steps, tested and evaluated with k = 2; its metrics.json."""
    result = run_cli(
        "vae_lightning.train", "trainer.max_epochs=1", f"+trainer.limit_train_batches={batches}", "eval.k=2",
        f"data.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}", *overrides,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


@contextmanager
def mlflow_server(store: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """A real ``mlflow server`` on a free loopback port over the tracking store ``store``; yields its
    address and a function that kills it (with the web server it starts)."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def kill() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    try:
        wait_until(lambda: _answers(f"{url}/health"), proc, "mlflow server answered", timeout=120)
        yield url, kill
    finally:
        kill()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
