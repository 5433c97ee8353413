"""Which directory a run writes in, chosen once in the launching process before Hydra makes it
(a Hydra callback, ``conf/hydra/default.yaml``): a new run gets a dir of its own, a continued run
(``ckpt_path=...``) the run it continues, and an unwritable or full disk is one line, not Hydra's
traceback."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write

from vae_lightning.errors import UserError
from vae_lightning.launch import first_process, slurm_restarts
from vae_lightning.outputs import WRITER_LOCK, check_writable
from vae_lightning.runs.resume import resolve
from vae_lightning.workarounds import set_for_every_job


def claim_new_dir(directory: Path) -> Path:
    """``directory`` made for this run alone, or ``<name>_2``, ``_3``, ... when another run that
    started in the same second has it: mkdir is atomic, so two runs never share one."""
    candidate, n = directory, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            n += 1
            candidate = directory.with_name(f"{directory.name}_{n}")


def named_by_user(config: DictConfig, key: str) -> bool:
    """Whether the command line set the Hydra setting ``key`` (``hydra.run.dir=...``)."""
    return any(o.startswith(f"{key}=") for o in config.hydra.overrides.hydra)


class RunDir(Callback):
    """``continue_runs`` (train): ``ckpt_path`` is resolved here, once (``resume.resolve``), into the
    run it continues, which becomes this run's dir (its checkpoints, tables and curves grow in
    place; each continuation's config is kept in ``.hydra/continued_<time>/``), and into the
    checkpoint file, which the job then reads. A continued sweep needs the sweep's dir."""

    def __init__(self, continue_runs: bool = False) -> None:
        self.continue_runs = continue_runs

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._choose_run_dir(config)
        except UserError as err:
            _stop(str(err))

    def _choose_run_dir(self, config: DictConfig) -> None:
        named = named_by_user(config, "hydra.run.dir")
        continuation = None
        if self.continue_runs:
            ckpt_path = config.get("ckpt_path")
            if named:
                ckpt_path = requeued_ckpt_path(ckpt_path, Path(config.hydra.run.dir))
            named_dir = config.hydra.run.dir if named and str(ckpt_path) == "last" else None
            continuation = resolve(ckpt_path, config.paths.log_dir, named_dir)
        with read_write(config):
            if continuation is not None:
                config.ckpt_path = str(continuation.checkpoint)  # the job reads this file, not "last" again
            if continuation is not None and continuation.run_dir is not None:
                check_writable(continuation.run_dir)
                config.hydra.run.dir = str(continuation.run_dir)
                if config.hydra.output_subdir is not None:  # (DDP children write none)
                    # the run's own .hydra/ keeps the config it started with; each continuation's beside it
                    config.hydra.output_subdir = f".hydra/continued_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
                return
            if named and config.hydra.output_subdir is not None and first_process():  # (the others join its run)
                refuse_a_finished_run(Path(config.hydra.run.dir))
            check_writable(Path(config.hydra.run.dir).parent)
            if not named:
                config.hydra.run.dir = str(claim_new_dir(Path(config.hydra.run.dir)))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        named = named_by_user(config, "hydra.sweep.dir")
        if self.continue_runs and str(config.get("ckpt_path")) == "last" and not named:
            sweep_dir = Path(config.hydra.sweep.dir)
            earlier = sorted(d for d in sweep_dir.parent.glob("*") if d.is_dir() and d != sweep_dir)
            which = f"the newest is {earlier[-1]}" if earlier else f"there is none in {sweep_dir.parent}"
            _stop(
                "in a multirun, ckpt_path=last continues each job of an earlier sweep in its own dir; "
                f"add hydra.sweep.dir=<that sweep's dir> and its overrides ({which})"
            )
        try:
            if named:  # a sweep to continue, or a dir the user chose
                check_writable(Path(config.hydra.sweep.dir))
                return
            check_writable(Path(config.hydra.sweep.dir).parent)
        except UserError as err:
            _stop(str(err))
        set_for_every_job(config, "hydra.sweep.dir", str(claim_new_dir(Path(config.hydra.sweep.dir))))


def refuse_a_finished_run(directory: Path) -> None:
    """A dir named with ``hydra.run.dir`` that holds a run is continued (``ckpt_path``), never written over."""
    held = [name for name in ("checkpoints", "epochs.csv", "metrics.json") if (directory / name).exists()]
    if held:
        raise UserError(
            f"hydra.run.dir={directory} holds a run already ({', '.join(held)}); continue it with "
            f"ckpt_path={directory}, or name a new dir"
        )


LAST = Path("checkpoints") / "last.ckpt"


def requeued_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``"last"`` for a job Slurm requeued (a pre-emption, a node failure, submitit's requeue at the
    time limit) whose command named no checkpoint and whose ``run_dir`` has one: it continues its
    own run. ``ckpt_path`` otherwise. Asked where a job's dir is known: a single run's before Hydra
    makes it (``RunDir``, a named ``hydra.run.dir``), a sweep job's when it plans (``train.plan``)."""
    if ckpt_path or not slurm_restarts() or not (run_dir / LAST).is_file():
        return ckpt_path
    return "last"


_held: dict[Path, int] = {}  # run dir -> the open lock file: held until the job ends or the process dies


def hold_run_dir(directory: Path) -> None:
    """Make this process the run dir's one writer, or refuse in one line naming the one that is.

    An exclusive ``flock`` on ``<dir>/.writer.lock``: the kernel drops it when the process ends,
    however it ends, so a killed run leaves no stale lock behind. Two continuations of one run at
    once would otherwise both train into it and trip over each other's checkpoint files."""
    if not first_process():  # the other processes of a DDP run write through the first
        return
    path = directory / WRITER_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(
            f"{directory} is being written by {holder}; wait until it ends (or stop it) before continuing this run"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
    _held[directory] = fd


def release_run_dir(directory: Path) -> None:
    """End this job's hold on its dir (a sweep's next job may run in the same process)."""
    if (fd := _held.pop(directory, None)) is not None:
        os.close(fd)


def _stop(reason: str) -> None:
    print(f"error: {reason}", file=sys.stderr)
    raise SystemExit(1)


def forget_continuation(out: Path, output_subdir: str | None) -> None:
    """Remove the ``.hydra/continued_<time>/`` that Hydra wrote for a continuation refused before it
    started: the run's dir is left as it was."""
    if output_subdir and output_subdir.startswith(".hydra/continued_"):
        shutil.rmtree(out / output_subdir, ignore_errors=True)
