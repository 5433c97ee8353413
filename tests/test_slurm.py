"""Slurm's time limits and pre-emptions, on a Slurm of one machine (tests/fake_slurm.py): a job
stopped by Slurm keeps what it finished, goes back to the queue, and continues from its own
last.ckpt without a person; submitit requeues at the time limit, and Lightning's own requeue is off."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fake_slurm
import pytest
from helpers import REPO, compose_train, epochs_column, load_checkpoint, run_cli
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment

from vae_lightning.workarounds import without_lightning_requeue

SHORT_JOB = ["+trainer.limit_train_batches=100", "trainer.max_epochs=4", "eval.k=2"]


def slurm_stops(stops: str, steps: str) -> list[str]:
    """Slurm stopping the job at known steps, one stop per start (tests/faulty_callbacks.py)."""
    return ["+callbacks.slurm._target_=faulty_callbacks.SlurmStops", f"+callbacks.slurm.stops={stops}",
            f"+callbacks.slurm.steps={steps}"]  # fmt: skip


def fake_cluster(tmp_path: Path) -> tuple[dict[str, str], Path]:
    state = tmp_path / "slurm"
    return {**fake_slurm.install(tmp_path / "bin", state), "PYTHONPATH": str(REPO / "tests")}, state


def slurm_sweep(tmp_path: Path, mnist_dir: Path, launcher: str, stops: str, steps: str, latent_dims: str) -> tuple:
    """A sweep over ``model.latent_dim`` launched on the fake Slurm, which stops each job as
    ``slurm_stops`` says: (the launching command's result, the fake's state dir, the sweep dir)."""
    env, state = fake_cluster(tmp_path)
    sweep = tmp_path / "sweep"
    result = run_cli(
        "vae_lightning.train", "-m", f"hydra/launcher={launcher}", "hydra.launcher.timeout_min=1", *SHORT_JOB,
        f"model.latent_dim={latent_dims}", f"data.data_dir={mnist_dir}", f"hydra.sweep.dir={sweep}",
        *slurm_stops(stops, steps), env=env,
    )  # fmt: skip
    return result, state, sweep


def job_states(state: Path, wait_s: float = 600) -> dict[str, dict]:
    """The fake Slurm's jobs once none is pending or running (a job's process may still be ending
    after it wrote the result its launcher read), waiting at most ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        jobs = {p.stem: json.loads(p.read_text()) for p in sorted(state.glob("*.json"))}
        if all(job["state"] not in ("PENDING", "RUNNING") for job in jobs.values()) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.5)


def trained_steps(run: Path) -> list[int]:
    callbacks = load_checkpoint(run / "checkpoints" / "last.ckpt")["callbacks"]
    return [v for k, v in callbacks.items() if "TrainingHistory" in k][0]["steps"]


@pytest.mark.slow
def test_a_submitit_sweep_carries_on_through_a_time_limit_and_a_preemption(tmp_path, mnist_dir):
    # start 1: the time-limit signal in epoch 2; start 2: a pre-emption Slurm requeues, in epoch 3;
    # start 3: a pre-emption that signals SIGTERM then USR2, which submitit requeues, in epoch 4
    stops, steps = "[time_limit,preempt,term_then_usr2]", "[150,250,350]"
    result, state, sweep = slurm_sweep(tmp_path, mnist_dir, "slurm", stops, steps, "2,3")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_states(state)
    assert list(jobs) == ["4242_0", "4242_1"]  # one Slurm array, as submitit submits a sweep
    assert all(job["restarts"] == 3 and job["state"] == "COMPLETED" for job in jobs.values()), jobs
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["status"], r["epochs"]) for r in rows] == [("completed", "4")] * 2
    assert all(float(r["test/iw_nll"]) > 0 for r in rows)
    for n in ("0", "1"):
        run = sweep / n
        assert epochs_column(run / "epochs.csv") == ["1", "2", "3", "4"]  # each epoch once
        assert trained_steps(run).tolist() == list(range(400))  # each step's record once
        assert (run / "report.html").is_file() and not list(run.rglob("hpc_ckpt*"))  # no Lightning requeue
        log = "".join(p.read_text() for p in (sweep / ".submitit" / f"4242_{n}").glob("*_log.*"))
        assert log.count("error: stopped by SIGUSR2 (Slurm's time limit or a pre-emption)") == 2
        assert f"Requeued job 4242_{n} (19 remaining" in log and f"Requeued job 4242_{n} (18 remaining" in log
        assert log.count("error: stopped by SIGTERM") == 1  # the pre-emption Slurm requeued itself
        assert log.count("it continues from its own last.ckpt") == 3


@pytest.mark.slow
def test_a_job_past_its_requeue_budget_says_so_and_keeps_its_epochs(tmp_path, mnist_dir):
    # Hydra's own submitit_slurm config requeues no time-out (max_num_timeout=0)
    result, state, sweep = slurm_sweep(tmp_path, mnist_dir, "submitit_slurm", "[time_limit]", "[150]", "20")
    assert result.returncode == 1 and result.stderr.strip().startswith("error: 1 of 1 jobs failed"), result.stderr
    assert job_states(state)["4242"]["restarts"] == 0
    status = json.loads((sweep / "0" / "metrics.json").read_text())["status"]
    assert status.startswith("failed: stopped by SIGUSR2, and submitit did not requeue the job: ")
    assert "timed-out too many times" in status and f"continue with ckpt_path={sweep / '0'}" in status
    assert epochs_column(sweep / "0" / "epochs.csv") == ["1"]  # the finished epoch is kept


@pytest.mark.slow
def test_a_cancelled_job_is_one_line_and_the_sweep_summary_is_written(tmp_path, mnist_dir):
    result, state, sweep = slurm_sweep(tmp_path, mnist_dir, "slurm", "[cancel]", "[150]", "20")
    assert job_states(state)["4242"]["state"] == "CANCELLED"
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[-2].startswith("error: submitit job 4242 ended without a result (CANCELLED)")
    assert lines[-1].startswith("error: 1 of 1 jobs failed")
    with (sweep / "summary.csv").open() as f:
        (row,) = csv.DictReader(f)
    assert row["status"].startswith("failed: stopped by SIGTERM") and "last.ckpt keeps epoch 1" in row["status"]


@pytest.mark.slow
def test_a_plain_sbatch_run_in_a_named_dir_continues_when_slurm_requeues_it(tmp_path, mnist_dir):
    env, state = fake_cluster(tmp_path)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "vae_lightning.train", f"hydra.run.dir={run}", *SHORT_JOB,
               f"data.data_dir={mnist_dir}", *slurm_stops("[preempt]", "[150]")]  # fmt: skip
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --requeue\n#SBATCH --output={tmp_path}/slurm-%j.out\n"
                      f"cd {REPO}\nsrun {subprocess.list2cmdline(command)}\n")  # fmt: skip
    subprocess.run(["sbatch", str(script)], env={**os.environ, **env}, check=True, capture_output=True)
    job, log = job_states(state)["4242"], (tmp_path / "slurm-4242.out").read_text()
    assert job["state"] == "COMPLETED" and job["restarts"] == 1, log[-3000:]
    assert "stopped by SIGTERM" in log and f"Continuing the run in {run}" in log
    assert epochs_column(run / "epochs.csv") == ["1", "2", "3", "4"] and trained_steps(run).tolist() == list(range(400))
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 4


def test_lightning_requeues_nothing_in_a_slurm_job(tmp_path, monkeypatch):
    cfg = compose_train(tmp_path)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "vae", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    environment = instantiate(without_lightning_requeue(cfg.trainer))._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False
    for name in slurm:
        monkeypatch.delenv(name)
    trainer = instantiate(without_lightning_requeue(cfg.trainer))
    assert not isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)
