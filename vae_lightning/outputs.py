"""Writing a run's files: check that it can before anything starts, write files whole, and turn a
full or read-only disk into one line; reading them back, tolerant of what a kill left."""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from vae_lightning.errors import UserError

WRITER_LOCK = ".writer.lock"  # in a run dir: held by the one process writing it (rundir.hold_run_dir)
# the disk's fault, not the code's: what to do about each
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # full disk, quota, file-size limit
DENIED_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}  # read-only mount, no permission


@contextmanager
def replaced_atomically(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write; it replaces ``path`` only once complete,
    and is removed on failure: a kill or a full disk never leaves a half-written file.

    ``durable`` also survives a power cut: the new file is on disk before the rename, and the
    rename before this returns (without it, the kernel may write the rename first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        if durable:
            _fsync(partial)
        os.replace(partial, path)
        if durable and os.name == "posix":  # a directory cannot be opened for fsync on Windows
            _fsync(path.parent)
    finally:
        partial.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | Path, data: dict) -> None:
    with replaced_atomically(path) as partial:
        partial.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path) -> dict | None:
    """What ``write_json`` wrote, or None where there is no readable file (a run that never got
    that far, or a disk that filled up before these files were written whole)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_overrides(run_dir: str | Path) -> list[str] | None:
    """The command-line overrides a run was given, as Hydra kept them in ``.hydra/overrides.yaml``;
    None where that file is missing or is not a list (a hand-edited or half-written file)."""
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(Path(run_dir) / ".hydra" / "overrides.yaml"))
    except Exception:  # missing, unreadable, not YAML: OmegaConf raises several kinds
        return None
    return [str(o) for o in overrides] if isinstance(overrides, list) else None


def check_writable(directory: str | Path) -> None:
    """Create ``directory`` if needed and write a few bytes in it; a failure is one clear line."""
    directory = Path(directory)
    probe = directory / f".write_probe_{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"vae_lightning" * 80)  # a 1 kB write fails on a full disk, an empty file may not
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as err:
        raise UserError(f"cannot write to {directory}: {err.strerror or err}; {_what_to_do(err)}") from None


def _what_to_do(err: OSError) -> str:
    if err.errno in FULL_ERRNOS:
        return "free space on that disk, or set paths.log_dir=<a directory on another disk>"
    return "set paths.log_dir=<a writable directory>"


def describe_disk_error(err: BaseException, run_dir: str | Path) -> str | None:
    """One line for an ``OSError`` a full or read-only disk caused, or None for any other error."""
    if not isinstance(err, OSError) or err.errno not in FULL_ERRNOS | DENIED_ERRNOS:
        return None
    if err.filename and err.errno in DENIED_ERRNOS and not _inside(err.filename, run_dir):
        # a file the run reads (data, a checkpoint), not one it writes: no log dir would help
        return f"{err.strerror or err}: {err.filename}; make it readable by this user, or point the run elsewhere"
    where = f" writing {err.filename}" if err.filename else f" writing the outputs in {run_dir}"
    return f"{err.strerror or err}{where}; {_what_to_do(err)}"


def _inside(path: str | Path, directory: str | Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(Path(directory).resolve().parent.parent)  # the log dir
    except (OSError, RuntimeError):
        return False


def quiet_disk_errors_in_threads() -> None:
    """TensorBoard writes from a thread; a full disk there would print the thread's traceback
    before the main thread meets the same error and reports it. Make that one line."""
    threading.excepthook = _one_line_for_disk_errors


def _one_line_for_disk_errors(args: threading.ExceptHookArgs) -> None:
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in FULL_ERRNOS | DENIED_ERRNOS:
        print(f"warning: a writer thread stopped: {args.exc_value}", file=sys.stderr)
    else:
        threading.__excepthook__(args)
