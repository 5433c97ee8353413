"""How a job ends when it does not finish: stopped by a signal (handed to submitit to requeue, in
a Slurm job that asks for it) or failed, each said in one line and recorded where it is looked for."""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vae_lightning.errors import UserError
from vae_lightning.outputs import describe_disk_error
from vae_lightning.runs.results import discard_if_unstarted, record_failure
from vae_lightning.training import stopping
from vae_lightning.training.checkpoints import saved_progress


def stopped(out: Path, signum: int | None) -> None:
    """Say what a stop signal stopped and what was kept; in a submitit job asked to requeue (its
    signal came, alone or after Slurm's SIGTERM), hand the job to submitit, which requeues it and
    ends this process. Exit 128 + the signal, with no result for a launcher to read: a job Slurm
    requeues runs again and gives its result then. ``signum`` None: another process of the run got
    the signal (DDP: they stop together), and this one says so rather than name a signal it never got."""
    by = "with the run's other processes (one of them got a stop signal)" if signum is None else None
    signum = signum or signal.SIGTERM
    if not stopping.requeue_asked(wait_s=5.0 if stopping.requeue_signal() else 0.0):
        reason = f"stopped {by or 'by ' + signal.Signals(signum).name}; {saved_progress(out)}"
        print(f"error: {reason}", file=sys.stderr)
        record_failure(out, reason)
        raise SystemExit(128 + signum)
    name, kept = stopping.requeue_signal().name, saved_progress(out, requeued=True)  # (reads last.ckpt)
    print(f"error: stopped by {name} (Slurm's time limit or a pre-emption); {kept}", file=sys.stderr)
    record_failure(out, f"stopped by {name}; {kept}")
    if (not_requeued := stopping.requeue()) is None:  # (once requeued, submitit ends the process)
        raise SystemExit(128 + signum)
    reason = f"stopped by {name}, and submitit did not requeue the job: {not_requeued}; {saved_progress(out)}"
    return failed(out, reason)  # a sweep's summary says so


def failed(out: Path, reason: str, refused: bool = False) -> None:
    """Say why the job stopped. A sweep job records it where the sweep summary finds it, and the
    other jobs go on. A single run's dir is removed when nothing started in it; otherwise the
    reason is recorded there, unless the run was ``refused`` before it began (its dir stays as it
    was). Then exit 1."""
    print(f"error: {reason}", file=sys.stderr)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        record_failure(out, reason)
        return None
    if not discard_if_unstarted(out) and not refused:
        record_failure(out, reason)
    raise SystemExit(1)


def ended(out: Path, work: Callable[[], float | None]) -> float | None:
    """``work()``'s result, or how the job ended without one, said in one line: stopped by a
    signal (a scheduler's stop or pre-emption: the whole sweep stops too), refused, or crashed."""
    try:
        return work()
    except SIGTERMException:
        return stopped(out, stopping.stop_signal())
    except UserError as err:
        reason = str(err)
    except Exception as err:
        reason = describe_disk_error(err, out)
        if reason is None:  # a bug, ours or a library's: its traceback, then what was kept
            traceback.print_exc()
            reason = f"the run crashed on {type(err).__name__}: {err} (traceback above)"
        reason += f"; {saved_progress(out)}"
    return failed(out, reason)
