"""What the program does when things go wrong, through the CLI as a user meets it: bad config,
missing or corrupt data, missing hardware, divergence, kills, Ctrl-C, crashes, unwritable and full
disks. (The checks behind the first three are unit-tested beside their code: test_configs.py,
test_data.py.)"""

import csv
import errno
import functools
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import (
    REPO,
    SHORT,
    brief_run,
    compose_train,
    epoch_rows,
    epochs_column,
    kill_early_in_epoch_2,
    load_checkpoint,
    run_cli,
    same_weights,
    wait_until,
)

from vae_lightning.data.datasets import MNIST_FILES, ensure_dataset
from vae_lightning.errors import DataError, DivergenceError
from vae_lightning.runs.building import build_run
from vae_lightning.training.checkpoints import AtomicCheckpointIO


@pytest.mark.slow
def test_cli_bad_value_is_one_line(tmp_path):
    # (a misspelled key or preset: test_configs.test_a_config_hydra_cannot_compose_is_one_line_...)
    bad = run_cli("vae_lightning.train", "model.lr=0", f"hydra.run.dir={tmp_path}")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == ["error: model.lr=0 is not valid: it must be a number > 0"]


@pytest.mark.slow
def test_cli_missing_gpus_or_cores_are_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli("vae_lightning.train", "trainer.accelerator=gpu", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: trainer.accelerator=gpu but no CUDA GPU was found on this machine; "
        "use trainer.accelerator=auto (or trainer=cpu) to train on the CPU"
    ]
    cores = os.cpu_count()
    too_many = run_cli(
        "vae_lightning.train", "trainer=ddp", f"trainer.devices={cores + 1}", f"hydra.run.dir={tmp_path}"
    )
    assert too_many.returncode == 1
    assert too_many.stderr.strip().splitlines() == [
        f"error: trainer.devices={cores + 1} CPU processes but this machine has {cores} cores; "
        f"use trainer.devices={cores} or fewer"
    ]


@pytest.mark.slow
def test_cli_without_data_ends_in_one_line(tmp_path):
    result = run_cli(
        "vae_lightning.train",
        f"data.data_dir={tmp_path / 'nowhere'}",
        "data.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: MNIST not found") and "VAE_DATA_DIR" in line
    assert not (tmp_path / "run").exists()  # no run dir holding only the failure


@pytest.mark.slow
def test_cli_with_a_truncated_file_ends_in_one_line_naming_it(tmp_path, mnist_dir):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for source in (mnist_dir / "MNIST" / "raw").glob("*-ubyte"):
        (raw / source.name).symlink_to(source)
    name = "train-images-idx3-ubyte"
    (raw / name).unlink()
    (raw / name).write_bytes((mnist_dir / "MNIST" / "raw" / name).read_bytes()[:1_000_000])
    result = run_cli(
        "vae_lightning.train", f"data.data_dir={tmp_path / 'data'}", "data.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: MNIST file {raw / name} has 1000000 bytes, expected 47040016"
    )
    assert "delete it" in lines[0] and "data.data_dir" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained on a partial set


class PoisonAtEpoch(L.Callback):
    """Makes the weights infinite when epoch ``epoch`` (1-based) starts, as a blow-up would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            with torch.no_grad():
                pl_module.model.encoder.fc_logvar.bias.fill_(1e4)


@pytest.mark.slow
def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, mnist_dir):
    cfg = compose_train(
        tmp_path, f"data.data_dir={mnist_dir}", "trainer.max_epochs=3", "+trainer.limit_train_batches=30"
    )
    datamodule, module, trainer = build_run(cfg, extra_callbacks=[PoisonAtEpoch(2)])
    with pytest.raises(DivergenceError, match=r"at step 31 of epoch 2; checkpoints/last.ckpt keeps epoch 1; try a"):
        trainer.fit(module, datamodule=datamodule)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert epochs_column(tmp_path / "epochs.csv") == ["1"]
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
    assert last_line in (tmp_path / "single" / "train.log").read_text()

    sweep = tmp_path / "sweep"
    result = run_cli(
        "vae_lightning.train", "-m", "model.lr=10,1e-3", "trainer.max_epochs=1", "+trainer.limit_train_batches=150",
        "eval.k=2", f"data.data_dir={mnist_dir}", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 1  # the sweep ran every job, and says at the end that one failed
    assert result.stderr.strip().splitlines()[-1] == f"error: 1 of 2 jobs failed (0); see {sweep / 'summary.md'}"
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

    kill_early_in_epoch_2([*common, f"hydra.run.dir={killed}"], killed / "epochs.csv")
    assert len((killed / "epochs.csv").read_text().splitlines()) == 2  # killed during epoch 2

    resumed = run_cli("vae_lightning.train", *common, f"ckpt_path={killed}", f"hydra.run.dir={tmp_path / 'new'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Continuing the run in {killed}" in resumed.stdout
    # the same data order and the same noise: bit-identical on the CPU, in the same run dir
    assert (killed / "epochs.csv").read_text() == (straight / "epochs.csv").read_text()
    assert same_weights(straight / "checkpoints" / "last.ckpt", killed / "checkpoints" / "last.ckpt")
    callbacks = load_checkpoint(killed / "checkpoints" / "last.ckpt")["callbacks"]
    history = [v for k, v in callbacks.items() if "TrainingHistory" in k][0]
    assert len(history["steps"]) == 300  # the curves cover all three epochs


@pytest.mark.slow
def test_a_run_killed_in_its_test_pass_is_completed_by_its_continuation(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    common = ["+trainer.limit_train_batches=30", "trainer.max_epochs=2", "eval.k=0", f"data.data_dir={mnist_dir}"]
    kill = ["+callbacks.kill._target_=faulty_callbacks.KillInTest"]
    killed = run_cli(
        "vae_lightning.train", *common, *kill, f"hydra.run.dir={run_dir}", env={"PYTHONPATH": str(REPO / "tests")}
    )
    assert killed.returncode == -9
    trained = json.loads((run_dir / "metrics.json").read_text())  # the finished training is kept
    assert "val/loss" in trained and "test/loss" not in trained and not (run_dir / "report.html").exists()

    continued = run_cli("vae_lightning.train", *common, f"ckpt_path={run_dir}")
    assert continued.returncode == 0, continued.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("train/loss", "val/loss", "val/kl"):  # the training's numbers stay, unchanged
        assert metrics[key] == pytest.approx(trained[key]), key
    assert {"test/loss", "test/rec", "test/kl", "wall_seconds"} <= set(metrics) and metrics["epochs"] == 2
    assert (run_dir / "report.html").is_file() and len(epoch_rows(run_dir)) == 2
    # the training's time is the first sitting's, as its last checkpoint kept it: this one trained nothing
    kept = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["callbacks"]["Timer"]["time_elapsed"]["train"]
    assert metrics["train_seconds"] == round(kept, 1) and 0 < kept <= trained["train_seconds"]


@pytest.mark.slow
def test_a_run_dir_has_one_writer_and_a_finished_run_is_never_written_over(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    common = ["+trainer.limit_train_batches=30", "eval.k=0", "test=false", f"data.data_dir={mnist_dir}"]
    first = run_cli("vae_lightning.train", *common, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    finished = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".writer.lock"}

    over = run_cli("vae_lightning.train", *common, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}")
    assert over.returncode == 1
    assert over.stderr.strip().splitlines() == [
        f"error: hydra.run.dir={run_dir} holds a run already (checkpoints, epochs.csv, metrics.json); continue it "
        f"with ckpt_path={run_dir}, or name a new dir"
    ]
    assert {p: p.read_bytes() for p in finished} == finished

    writer = subprocess.Popen(
        [sys.executable, "-m", "vae_lightning.train", *common, "trainer.max_epochs=30", f"ckpt_path={run_dir}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        lock = run_dir / ".writer.lock"
        wait_until(lambda: lock.is_file() and f"process {writer.pid} " in lock.read_text(), writer, "it held the dir")
        second = run_cli("vae_lightning.train", *common, "trainer.max_epochs=30", f"ckpt_path={run_dir}")
        assert second.returncode == 1
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(f"error: {run_dir.resolve()} is being written by process {writer.pid} on ")
        assert line.endswith("wait until it ends (or stop it) before continuing this run")
        assert writer.poll() is None  # the first writer goes on
    finally:
        writer.kill()
        writer.wait()
    done = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] + 1  # (epochs.csv may have one more)
    fewer = run_cli("vae_lightning.train", *common, "trainer.max_epochs=1", f"ckpt_path={run_dir}")
    assert fewer.returncode == 1 and fewer.stderr.strip().splitlines() == [
        f"error: {run_dir.resolve()}/checkpoints/last.ckpt has trained {done} epochs, more than trainer.max_epochs=1; "
        f"continue it with trainer.max_epochs={done} or more"
    ]
    # the killed writer's lock went with it: the run continues
    again = run_cli("vae_lightning.train", *common, f"trainer.max_epochs={done + 1}", f"ckpt_path={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(epoch_rows(run_dir)) == done + 1


@pytest.mark.slow
def test_a_sweep_killed_mid_job_continues_where_it_stopped(tmp_path, mnist_dir):
    sweep = ["-m", "model.latent_dim=2,3", "+trainer.limit_train_batches=100", "trainer.max_epochs=3"]
    sweep += ["eval.k=0", "test=false", f"data.data_dir={mnist_dir}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = run_cli("vae_lightning.train", *sweep, f"hydra.sweep.dir={straight}")
    assert result.returncode == 0, result.stderr[-3000:]

    kill_early_in_epoch_2([*sweep, f"hydra.sweep.dir={killed}"], killed / "1" / "epochs.csv")  # in job 1
    finished = (killed / "0" / "metrics.json").read_bytes()
    assert not (killed / "1" / "metrics.json").exists()

    # which sweep to continue must be said: a new sweep dir would have nothing to continue
    unsaid = run_cli("vae_lightning.train", *sweep, "ckpt_path=last", f"paths.log_dir={tmp_path / 'logs'}")
    assert unsaid.returncode == 1 and len(unsaid.stderr.strip().splitlines()) == 1
    assert unsaid.stderr.startswith("error: in a multirun, ckpt_path=last continues each job of an earlier sweep")

    resumed = run_cli("vae_lightning.train", *sweep, "ckpt_path=last", f"hydra.sweep.dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"This job finished before, in {killed / '0'} (epoch 3): its results are kept" in resumed.stdout
    assert f"Continuing the run in {killed / '1'}" in resumed.stdout
    assert (killed / "0" / "metrics.json").read_bytes() == finished  # a finished job is not run again
    for job in ("0", "1"):
        assert (killed / job / "epochs.csv").read_text() == (straight / job / "epochs.csv").read_text(), job
    assert same_weights(straight / "1" / "checkpoints" / "last.ckpt", killed / "1" / "checkpoints" / "last.ckpt")
    with (killed / "summary.csv").open() as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["completed", "completed"]


@pytest.mark.slow
def test_continuing_with_other_model_settings_is_one_line(tmp_path, trained_run):
    run_dir, _ = trained_run
    result = run_cli("vae_lightning.train", f"ckpt_path={run_dir}", "model.latent_dim=2", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {run_dir}/checkpoints/last.ckpt was trained with other settings: model.latent_dim=2 (the checkpoint "
        "has 20); continue it with the same model.* values, or start a new run without ckpt_path"
    ]

    # refused in the run's own dir: the finished run is left as it was, not marked failed, and no
    # config of a continuation that did not happen is kept (other tests read this run meanwhile)
    def what_a_continuation_writes() -> dict:
        files = [run_dir / "metrics.json", run_dir / "epochs.csv", run_dir / "train.log"]
        files += [*(run_dir / "checkpoints").iterdir(), *(run_dir / ".hydra").rglob("*")]
        return {p: p.is_file() and p.read_bytes() for p in files}

    before = what_a_continuation_writes()
    in_place = run_cli("vae_lightning.train", f"ckpt_path={run_dir}", "model.latent_dim=2")
    assert in_place.returncode == 1 and len(in_place.stderr.strip().splitlines()) == 1
    assert what_a_continuation_writes() == before


@pytest.mark.slow
def test_resume_from_nothing_is_one_clear_error(tmp_path):
    result = run_cli("vae_lightning.train", "ckpt_path=last", f"paths.log_dir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: ckpt_path=last but no run in {tmp_path}/train/runs has checkpoints/last.ckpt"
    ]
    assert not (tmp_path / "train").exists()  # said before a run dir was made
    named = run_cli("vae_lightning.train", "ckpt_path=last", f"hydra.run.dir={tmp_path}/r")
    assert named.returncode == 1
    assert named.stderr.strip().splitlines() == [
        f"error: ckpt_path=last but {tmp_path}/r has no checkpoints/last.ckpt; name another run"
    ]


@pytest.mark.slow
def test_the_same_config_and_seed_twice_give_identical_runs(tmp_path, mnist_dir):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        result = run_cli("vae_lightning.train", *SHORT, f"data.data_dir={mnist_dir}", f"hydra.run.dir={run}")
        assert result.returncode == 0, result.stderr[-3000:]
    assert epochs_column(runs[0] / "epochs.csv") == ["1", "2"]
    assert (runs[0] / "epochs.csv").read_text() == (runs[1] / "epochs.csv").read_text()
    assert same_weights(*(run / "checkpoints" / "last.ckpt" for run in runs))


@pytest.mark.slow
def test_a_crash_in_a_callback_keeps_the_last_finished_epoch_and_says_how_to_continue(tmp_path, mnist_dir):
    run = tmp_path / "run"
    crash = ["+callbacks.crash._target_=faulty_callbacks.RaiseAtEpochEnd", "+callbacks.crash.epoch=2"]
    common = [*SHORT, f"data.data_dir={mnist_dir}"]
    env = {"PYTHONPATH": str(REPO / "tests")}
    result = run_cli("vae_lightning.train", *common, *crash, f"hydra.run.dir={run}", env=env)
    assert result.returncode == 1
    assert "Traceback" in result.stderr  # a bug shows its traceback, then what was kept
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == (
        "error: the run crashed on RuntimeError: a callback failed at the end of epoch 2 (traceback above); "
        f"{run}/checkpoints/last.ckpt keeps epoch 1; continue with ckpt_path={run}"
    )
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert json.loads((run / "metrics.json").read_text())["status"].startswith("failed: the run crashed")

    resumed = run_cli("vae_lightning.train", *common, f"ckpt_path={run}", f"hydra.run.dir={tmp_path / 'new'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert epochs_column(run / "epochs.csv") == ["1", "2"]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 1


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_what_was_kept(tmp_path, mnist_dir):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vae_lightning.train", *SHORT, "trainer.max_epochs=20",
         f"data.data_dir={mnist_dir}", f"hydra.run.dir={run}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # as a terminal's foreground job: a shell's background job (&, as CI may be started) ignores
        # SIGINT, and a Python started so never turns it into KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    wait_until((run / "checkpoints" / "last.ckpt").is_file, proc, "last.ckpt appeared")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-3000:]
    kept = load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] + 1
    assert kept < 20
    assert f"Interrupted: {run}/checkpoints/last.ckpt keeps epoch {kept}; continue with ckpt_path={run}" in stderr
    assert "Traceback" not in stderr


@functools.cache
def private_mounts() -> str | None:
    """Why a private tmpfs cannot be mounted here (a user namespace is needed), or None."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True, text=True)
    return probe.stderr.strip() or f"unshare exited {probe.returncode}" if probe.returncode else None


def in_private_mount(tmp_path: Path, script: str) -> None:
    """Run a bash ``script`` in its own mount namespace, where it can mount a small or read-only
    tmpfs: a real full or read-only disk without root. It sees ``$mnt`` and ``$out``."""
    if reason := private_mounts():
        pytest.skip(f"cannot mount a private tmpfs here: {reason}")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    header = f'set -u\nmnt={mnt}\nout={out}\ncd {REPO}\ntrain() {{ {sys.executable} -m vae_lightning.train "$@"; }}\n'
    result = subprocess.run(["unshare", "-rm", "bash", "-c", header + script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_an_unwritable_or_full_log_dir_is_one_line_before_anything_runs(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    single = run_cli("vae_lightning.train", f"paths.log_dir={not_a_dir}/logs")
    sweep = run_cli("vae_lightning.train", "-m", "model.lr=1e-3,2e-3", f"paths.log_dir={not_a_dir}/logs")
    fix = ": Not a directory; set paths.log_dir=<a writable directory>"
    assert single.returncode == 1 and sweep.returncode == 1
    assert single.stderr.strip().splitlines() == [f"error: cannot write to {not_a_dir}/logs/train/runs{fix}"]
    assert sweep.stderr.strip().splitlines() == [f"error: cannot write to {not_a_dir}/logs/train/multiruns{fix}"]

    in_private_mount(
        tmp_path,
        """
mkdir $mnt/ro $mnt/full
mount -t tmpfs -o ro tmpfs $mnt/ro
mount -t tmpfs -o size=64k tmpfs $mnt/full && cat /dev/zero > $mnt/full/filler 2>/dev/null
train paths.log_dir=$mnt/ro/logs 2> $out/ro.err; echo $? > $out/ro.rc
train paths.log_dir=$mnt/full/logs 2> $out/full.err; echo $? > $out/full.rc
""",
    )
    out = tmp_path / "out"
    mnt = tmp_path / "mnt"
    assert (out / "ro.rc").read_text().strip() == "1" and (out / "full.rc").read_text().strip() == "1"
    assert (out / "ro.err").read_text().strip().splitlines() == [
        f"error: cannot write to {mnt}/ro/logs/train/runs: Read-only file system; "
        "set paths.log_dir=<a writable directory>"
    ]
    assert (out / "full.err").read_text().strip().splitlines() == [
        f"error: cannot write to {mnt}/full/logs/train/runs: No space left on device; "
        "free space on that disk, or set paths.log_dir=<a directory on another disk>"
    ]


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_keeps_the_finished_epoch_and_the_run_continues_once_freed(tmp_path, mnist_dir):
    args = " ".join([*SHORT, f"data.data_dir={mnist_dir}"])
    in_private_mount(
        tmp_path,
        f"""
mount -t tmpfs -o size=48m tmpfs $mnt
train {args} hydra.run.dir=$mnt/run > $out/first.out 2> $out/first.err &
pid=$!
until [ -f $mnt/run/checkpoints/last.ckpt ] || ! kill -0 $pid 2>/dev/null; do sleep 0.05; done
cat /dev/zero > $mnt/filler 2>/dev/null  # the disk is full from here on
wait $pid; echo $? > $out/first.rc
cp -a $mnt/run $out/stopped
rm $mnt/filler
train {args} ckpt_path=$mnt/run hydra.run.dir=$mnt/new > $out/resumed.out 2> $out/resumed.err
echo $? > $out/resumed.rc
cp -a $mnt/run $out/resumed
""",
    )
    out, run = tmp_path / "out", tmp_path / "mnt" / "run"
    stderr = (out / "first.err").read_text()
    assert (out / "first.rc").read_text().strip() == "1", stderr[-3000:]
    assert "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: No space left on device writing ")
    assert last_line.endswith(
        "free space on that disk, or set paths.log_dir=<a directory on another disk>; "
        f"{run}/checkpoints/last.ckpt keeps epoch 1; continue with ckpt_path={run}"
    )
    stopped = out / "stopped"
    assert epochs_column(stopped / "epochs.csv") == ["1"]
    assert load_checkpoint(stopped / "checkpoints" / "last.ckpt")["epoch"] == 0
    assert not list(stopped.rglob("*.partial"))  # no half-written file left behind
    assert all(f.stat().st_size > 0 for f in stopped.glob("*.*") if f.suffix in (".png", ".json", ".csv"))

    assert (out / "resumed.rc").read_text().strip() == "0", (out / "resumed.err").read_text()[-3000:]
    resumed = out / "resumed"
    assert epochs_column(resumed / "epochs.csv") == ["1", "2"]
    assert (resumed / "epochs.csv").read_text().splitlines()[1] == (stopped / "epochs.csv").read_text().splitlines()[1]
    assert (resumed / "loss_curves.png").stat().st_size > 0


def test_checkpoints_are_written_beside_their_target_and_renamed_into_place(tmp_path, monkeypatch):
    events = []
    replace, fsync = os.replace, os.fsync
    monkeypatch.setattr(
        os, "replace", lambda src, dst: events.append(("rename", Path(src), Path(dst))) or replace(src, dst)
    )
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")))) or fsync(fd)
    )
    target = tmp_path / "checkpoints" / "last.ckpt"
    partial = target.with_name("last.ckpt.partial")
    for epoch in range(2):
        AtomicCheckpointIO().save_checkpoint({"epoch": epoch}, target)
    # a rename within one directory, never a copy over the old file wherever /tmp is; the new file
    # reaches the disk before the rename, and the rename before the next epoch starts
    assert events == [("fsync", partial), ("rename", partial, target), ("fsync", target.parent)] * 2
    assert load_checkpoint(target)["epoch"] == 1 and list(target.parent.iterdir()) == [target]


def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one_whole(tmp_path):
    in_private_mount(
        tmp_path,
        f"""
mount -t tmpfs -o size=12m tmpfs $mnt
{sys.executable} - > $out/result 2>&1 <<PY
import torch
from vae_lightning.training.checkpoints import AtomicCheckpointIO
AtomicCheckpointIO().save_checkpoint({{"epoch": 0, "w": torch.ones(2_000_000)}}, "$mnt/last.ckpt")  # 8 MB
try:
    AtomicCheckpointIO().save_checkpoint({{"epoch": 1, "w": torch.zeros(2_000_000)}}, "$mnt/last.ckpt")
except OSError as err:
    print(err.errno, err.filename)
PY
ls -A $mnt > $out/files
cp $mnt/last.ckpt $out/
""",
    )
    out, mnt = tmp_path / "out", tmp_path / "mnt"
    assert (out / "result").read_text().split() == [str(errno.ENOSPC), f"{mnt}/last.ckpt"]
    assert (out / "files").read_text().split() == ["last.ckpt"]  # no partial file left
    kept = load_checkpoint(out / "last.ckpt")
    assert kept["epoch"] == 0 and torch.equal(kept["w"], torch.ones(2_000_000))


@pytest.mark.slow
def test_sigterm_stops_cleanly_says_what_was_kept_and_the_run_continues(tmp_path, mnist_dir):
    """What Slurm and most schedulers send before they stop or pre-empt a job."""
    run = tmp_path / "run"
    args = [*SHORT, "trainer.max_epochs=4", f"data.data_dir={mnist_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vae_lightning.train", *args, f"hydra.run.dir={run}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_until((run / "checkpoints" / "last.ckpt").is_file, proc, "last.ckpt appeared")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    kept = state["epoch"] + 1
    line = f"error: stopped by SIGTERM; {run}/checkpoints/last.ckpt keeps epoch {kept}; continue with ckpt_path={run}"
    assert stderr.strip().splitlines()[-1] == line and "Traceback" not in stderr
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed: " + line[len("error: ") :]
    # as if the first sitting had trained for 10^6 s: the continuation's training time adds to it
    assert state["callbacks"]["Timer"]["time_elapsed"]["train"] > 0
    state["callbacks"]["Timer"]["time_elapsed"]["train"] = 1e6
    torch.save(state, run / "checkpoints" / "last.ckpt")
    resumed = run_cli("vae_lightning.train", *args, f"ckpt_path={run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert epochs_column(run / "epochs.csv") == ["1", "2", "3", "4"]
    assert json.loads((run / "metrics.json").read_text())["train_seconds"] > 1e6


@pytest.mark.slow
def test_a_one_dimensional_latent_space_gets_every_figure(tmp_path, mnist_dir):
    metrics = brief_run(tmp_path, mnist_dir, "model.latent_dim=1", batches=50)
    for name in ("samples", "samples_100", "reconstructions", "interpolations", "latent_scatter", "loss_curves"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0, name
    assert "status" not in metrics and metrics["test/active_units"] <= 1


@pytest.mark.slow
def test_a_failure_after_training_keeps_the_finished_metrics(tmp_path, mnist_dir):
    result = run_cli(
        "vae_lightning.train", "trainer.max_epochs=1", "+trainer.limit_train_batches=30", "eval.k=0",
        "+callbacks.crash._target_=faulty_callbacks.RaiseInTest", f"data.data_dir={mnist_dir}",
        f"hydra.run.dir={tmp_path}", env={"PYTHONPATH": str(REPO / "tests")},
    )  # fmt: skip
    assert result.returncode == 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"].startswith("failed: the run crashed on RuntimeError: a callback failed in the test pass")
    assert metrics["epochs"] == 1 and metrics["train/loss"] > 0 and metrics["val/loss"] > 0


@pytest.mark.slow
def test_gzipped_mnist_is_used_offline(tmp_path, mnist_dir):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        with (mnist_dir / "MNIST" / "raw" / name).open("rb") as source, gzip.open(raw / f"{name}.gz", "wb", 1) as out:
            shutil.copyfileobj(source, out)
    assert ensure_dataset(tmp_path, download=False) == raw
    assert all((raw / name).stat().st_size == size for name, (size, _) in MNIST_FILES.items())
    (raw / "t10k-labels-idx1-ubyte").unlink()
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=r"MNIST archive .*t10k-labels-idx1-ubyte.gz cannot be decompressed"):
        ensure_dataset(tmp_path, download=False)


@pytest.mark.slow
def test_a_new_key_nothing_reads_is_one_line_at_the_cli(tmp_path):
    result = run_cli("vae_lightning.train", "+foo=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: +foo=1: foo is not a setting of this project, so nothing would read it; check its spelling"
    ]
