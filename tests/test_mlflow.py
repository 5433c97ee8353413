"""logger=mlflow on real MNIST: a run, a killed and continued run, a sweep, a store that is down or
locked at start and one lost mid-run, all read back with MlflowClient; and a real ``mlflow server``
in Chromium."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, free_port, load_checkpoint, mlflow_server, run_cli, wait_until

mlflow_tracking = pytest.importorskip("mlflow.tracking")

STEPS = 100  # per epoch
COMMON = [f"+trainer.limit_train_batches={STEPS}", "eval.k=0", "logger=mlflow", "+trainer.limit_val_batches=10"]


def client_for(log_dir: Path):
    return mlflow_tracking.MlflowClient(f"sqlite:///{log_dir.resolve() / 'mlflow.db'}")


def runs_of(client) -> list:
    experiment = client.get_experiment_by_name("vae_lightning")
    return client.search_runs([experiment.experiment_id])


def steps_and_values(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [m.step for m in history], [m.value for m in history]


@pytest.fixture(scope="module")
def continued_run(tmp_path_factory, mnist_dir) -> tuple[Path, Path, str]:
    """A 3-epoch run logged to MLflow, SIGKILLed at step 150 (epoch 2) after MLflow had steps past its
    epoch-1 checkpoint, then continued: (log dir, run dir, the continuation's stdout)."""
    tmp = tmp_path_factory.mktemp("mlflow_run")
    log_dir, run_dir = tmp / "logs", tmp / "logs" / "the_run"
    args = [*COMMON, "trainer.max_epochs=3", f"data.data_dir={mnist_dir}", f"paths.log_dir={log_dir}"]
    # blocks of 20 steps (60 values) go out as soon as they are made, so the kill lands after some of epoch 2 is in
    sending = ["callbacks.training_history.flush_every=20", "+logger.mlflow.metrics_per_request=60"]
    kill = ["+callbacks.kill._target_=faulty_callbacks.KillAtStep", "+callbacks.kill.step=151"]
    tests = {"PYTHONPATH": str(REPO / "tests")}
    killed = run_cli("vae_lightning.train", *args, *sending, *kill, f"hydra.run.dir={run_dir}", env=tests)
    assert killed.returncode == -9, killed.stderr[-3000:]
    (run,) = runs_of(client_for(log_dir))
    # in order and past the checkpoint (step 99): up to step 139 unless the kill caught the last blocks on their way
    sent = steps_and_values(client_for(log_dir), run.info.run_id, "train/rec_step")[0]
    assert sent == list(range(len(sent))) and len(sent) >= STEPS
    continued = run_cli("vae_lightning.train", *args, *sending, f"ckpt_path={run_dir}")
    assert continued.returncode == 0, continued.stderr[-3000:]
    return log_dir, run_dir, continued.stdout


@pytest.mark.slow
def test_a_continued_run_is_the_same_mlflow_run_without_holes_or_repeats(continued_run):
    log_dir, run_dir, stdout = continued_run
    client = client_for(log_dir)
    (run,) = runs_of(client)  # one MLflow run for the run dir, killed and continued
    assert run.info.run_name == "the_run" and run.info.status == "FINISHED"
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in stdout
    history = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["callbacks"]
    history = next(v for k, v in history.items() if "TrainingHistory" in k)
    for column, term in enumerate(("rec", "kl", "loss")):
        steps, values = steps_and_values(client, run.info.run_id, f"train/{term}_step")
        assert steps == list(range(3 * STEPS))  # every step once: those sent before the kill are not sent again
        assert values == history["step_values"][:, column].tolist()  # bit for bit the run's own record
    with (run_dir / "epochs.csv").open() as f:
        epochs = list(csv.DictReader(f))
    for key in ("train/loss", "val/loss", "val/kl"):
        steps, values = steps_and_values(client, run.info.run_id, key)
        assert steps == [STEPS * e - 1 for e in (1, 2, 3)]
        assert values == pytest.approx([float(row[key]) for row in epochs], abs=1e-5)
    assert "epoch" not in run.data.metrics
    assert {"test/loss", "test/rec", "test/kl"} <= set(run.data.metrics)
    params = run.data.params
    assert params["model.latent_dim"] == "20" and params["data.dataset"] == "mnist"
    assert params["trainer.max_epochs"] == "3" and params["data.binarize"] == "none"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "metrics.json", "epochs.csv", "loss_curves.png", "samples.png"} <= artifacts
    assert (
        Path(client.download_artifacts(run.info.run_id, "epochs.csv")).read_text()
        == (run_dir / "epochs.csv").read_text()
    )


@pytest.mark.slow
def test_a_run_continued_with_mlflow_for_the_first_time_gets_its_whole_history(tmp_path, mnist_dir):
    log_dir, run_dir = tmp_path / "logs", tmp_path / "run"
    args = [*COMMON[:2], "test=false", f"data.data_dir={mnist_dir}", f"paths.log_dir={log_dir}"]
    first = run_cli("vae_lightning.train", *args, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}")  # TensorBoard
    assert first.returncode == 0, first.stderr[-3000:]
    continued = run_cli("vae_lightning.train", *args, "trainer.max_epochs=3", "logger=mlflow", f"ckpt_path={run_dir}")
    assert continued.returncode == 0, continued.stderr[-3000:]
    client = client_for(log_dir)
    (run,) = runs_of(client)
    assert steps_and_values(client, run.info.run_id, "train/kl_step")[0] == list(range(3 * STEPS))
    steps, values = steps_and_values(client, run.info.run_id, "val/loss")
    assert steps == [STEPS * e - 1 for e in (1, 2, 3)]
    with (run_dir / "epochs.csv").open() as f:
        assert values == pytest.approx([float(row["val/loss"]) for row in csv.DictReader(f)], abs=1e-5)


@pytest.mark.slow
def test_the_mlflow_server_shows_the_run_and_its_step_curves(continued_run, browser):
    log_dir, _, _ = continued_run
    (run,) = runs_of(client_for(log_dir))
    with mlflow_server(f"sqlite:///{log_dir.resolve() / 'mlflow.db'}") as (url, _):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/#/experiments/{run.info.experiment_id}/runs")
        page.get_by_text("the_run").first.wait_for(timeout=60_000)  # the experiment lists the run
        page.goto(f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/model-metrics")
        page.get_by_placeholder("Search metric charts").fill("rec_step")
        chart = page.locator("[data-testid='experiment-view-compare-runs-card']").filter(has_text="rec_step")
        chart.first.wait_for(timeout=60_000)
        line = chart.first.locator("path.js-line").first  # plotted, not an empty card
        line.wait_for(timeout=60_000)
        assert line.get_attribute("d").count("L") > 10


@pytest.mark.slow
def test_a_sweep_is_one_parent_run_with_a_child_run_per_job(tmp_path, mnist_dir):
    log_dir, sweep_dir = tmp_path / "logs", tmp_path / "sweep"
    result = run_cli(
        "vae_lightning.train", "-m", "model.latent_dim=2,3", *COMMON, "++trainer.limit_train_batches=20",
        "trainer.max_epochs=1", "test=false", f"data.data_dir={mnist_dir}", f"paths.log_dir={log_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    client = client_for(log_dir)
    runs = {run.info.run_name: run for run in runs_of(client)}
    assert set(runs) == {"sweep", "sweep/model.latent_dim=2", "sweep/model.latent_dim=3"}
    parent = runs["sweep"]
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"summary.md", "summary.csv"}
    for name in ("sweep/model.latent_dim=2", "sweep/model.latent_dim=3"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert runs[name].data.params["model.latent_dim"] == name[-1]


@pytest.mark.slow
def test_a_tracking_store_down_or_locked_at_start_is_one_line_before_training(tmp_path, mnist_dir):
    down = f"http://127.0.0.1:{free_port()}"
    result = run_cli(
        "vae_lightning.train", *COMMON, f"logger.mlflow.tracking_uri={down}", f"data.data_dir={mnist_dir}",
        f"hydra.run.dir={tmp_path / 'down'}",
    )  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: the MLflow tracking store {down} cannot be used: ")
    assert line.endswith("point logger.mlflow.tracking_uri at another (or use logger=tensorboard)")
    assert not (tmp_path / "down").exists()  # nothing started, nothing left

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    holder = sqlite3.connect(log_dir / "mlflow.db")
    holder.execute("BEGIN EXCLUSIVE")  # another program holds the store
    try:
        result = run_cli("vae_lightning.train", *COMMON, f"data.data_dir={mnist_dir}", f"paths.log_dir={log_dir}")
    finally:
        holder.close()
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: the MLflow tracking store sqlite:///{log_dir.resolve()}/mlflow.db cannot be used:")
    assert "locked" in line


@pytest.mark.slow
def test_a_store_lost_mid_run_is_one_warning_and_the_run_completes(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    args = [*COMMON, "trainer.max_epochs=2", f"data.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}"]
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}") as (url, kill_server):
        proc = subprocess.Popen(
            [sys.executable, "-m", "vae_lightning.train", *args, f"logger.mlflow.tracking_uri={url}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        epochs = run_dir / "epochs.csv"
        wait_until(lambda: epochs.is_file() and len(epochs.read_text().splitlines()) >= 2, proc, "epoch 1 ended")
        kill_server()  # lost in epoch 2
        stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    warnings = stderr.strip().splitlines()
    assert len(warnings) == 2, stderr
    assert warnings[0].startswith(f"warning: the MLflow tracking store {url} stopped answering (")
    assert warnings[0].endswith("training goes on, the rest of this run is not sent to MLflow")
    assert "not sent: " in warnings[1] and warnings[1].endswith(f"Everything is in {run_dir.resolve()}")
    # what was made locally is whole: the test pass, the report, both epochs
    assert (run_dir / "report.html").is_file() and len(epochs.read_text().splitlines()) == 3
    assert "test/loss" in json.loads((run_dir / "metrics.json").read_text())
    assert "Final per-image metrics:" in stdout
