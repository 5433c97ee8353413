"""The signals that ask a run to stop, and what follows a stop.

SIGTERM is what Slurm and most schedulers send before they stop or pre-empt a job. In a Slurm job
launched by submitit (``hydra/launcher=slurm``) there is a second: the signal submitit has Slurm send
before the time limit and on pre-emption (USR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise).
Either one only sets a flag here; ``callbacks.StopOnSignal`` stops every process of the run at a step
boundary, and what finished is kept. After a stop by submitit's signal, ``requeue`` hands the job to
submitit's own handler, which pickles the job again and runs ``scontrol requeue``; the requeued job
continues from its ``last.ckpt`` (``launch.slurm_restarts``). One requeuer: Lightning's own Slurm
requeue is off (``workarounds.without_lightning_requeue``)."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

_received: list[int] = []  # the stop signals this job got, in order
_submitit_handler: list[Any] = []  # what submitit installed for its signal, called by requeue()


def requeue_signal() -> signal.Signals | None:
    """The signal submitit has Slurm send before the time limit and on pre-emption, in a submitit
    Slurm job; None elsewhere (a plain ``sbatch`` script, a workstation)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


def _note(signum: int, frame: Any) -> None:
    _received.append(signum)


def listen(new_job: bool = False) -> None:
    """Send this process's stop signals to the flag: at a job's start (``new_job``: forgetting the
    last job's), and again when a training or test pass starts, because Lightning then installs its
    own SIGTERM handler, which runs a collective inside the handler and deadlocks DDP when only some
    processes got the signal (Lightning#20806)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if new_job:
        _received.clear()
    for sig in (signal.SIGTERM, requeue_signal()):
        if sig is None:
            continue
        current = signal.getsignal(sig)
        if sig != signal.SIGTERM and current is not _note and callable(current):
            _submitit_handler[:] = [current]
        signal.signal(sig, _note)


def stop_signal() -> int | None:
    """The first stop signal this process got in this job, or None."""
    return _received[0] if _received else None


def requeue_asked(wait_s: float = 0.0) -> bool:
    """Whether submitit's signal came, waiting up to ``wait_s`` for it: on a pre-emption Slurm sends
    SIGTERM and then the job's ``--signal``, and the run may have stopped on the first."""
    sig = requeue_signal()
    deadline = time.monotonic() + wait_s
    while sig is not None and sig not in _received and time.monotonic() < deadline:
        time.sleep(0.05)
    return sig is not None and sig in _received


def requeue() -> str | None:
    """After a stop by submitit's signal: submitit's own handler checkpoints the job (its launcher
    resubmits the same job), runs ``scontrol requeue`` and ends this process. Returns why the job was
    not requeued (submitit's reason, e.g. too many time-outs), or None when there was nothing to do."""
    sig = requeue_signal()
    if not requeue_asked() or not _submitit_handler:
        return None
    try:
        _submitit_handler[0](sig, None)  # ends the process (SystemExit) once the job is requeued
    except Exception as err:  # submitit's UncompletedJobError, or scontrol failing
        return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return None
