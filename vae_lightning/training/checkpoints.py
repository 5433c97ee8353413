"""Checkpoints: which file a run dir means, reading one without running its code, writing one whole."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO

from vae_lightning.errors import UserError
from vae_lightning.outputs import replaced_atomically
from vae_lightning.workarounds import refused_global


class EpochCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with ``{epoch}`` in file names counted from 1, as the progress
    lines, ``epochs.csv`` and the report count (the reference notebook prints "Epoch: 1" first):
    the 94th epoch's weights are ``epoch_094.ckpt``, not Lightning's ``epoch_093.ckpt``."""

    def format_checkpoint_name(
        self, metrics: dict[str, Any], filename: str | None = None, ver: int | None = None, prefix: str | None = None
    ) -> str:
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": metrics["epoch"] + 1}
        return super().format_checkpoint_name(metrics, filename, ver, prefix)

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so that runs checkpointed before this class continue with their best
        # score, and find_checkpoint reads which file is best
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)


def find_checkpoint(path: str | Path, which: Literal["best", "last"]) -> Path:
    """A checkpoint file as given, or in a run dir (or its ``checkpoints/``) the ``best`` weights
    by val/loss or the ``last`` epoch's."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.resolve()
    if not p.is_dir():
        raise UserError(f"checkpoint {p} does not exist; pass ckpt_path=<file.ckpt> or a training run dir")
    folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    last = folder / "last.ckpt"
    best = sorted(folder.glob("epoch_*.ckpt"))
    if which == "best" and len(best) > 1 and last.is_file():  # the ModelCheckpoint state knows which
        states = load_checkpoint(last).get("callbacks", {})
        named = [v.get("best_model_path") for k, v in states.items() if "ModelCheckpoint" in k]
        best = [Path(b) for b in named if b and Path(b).is_file()] or best
    candidates = best[:1] + [last] if which == "best" else [last]
    found = [c for c in candidates if c.is_file()]
    if not found:
        raise UserError(f"no {which} checkpoint in {folder}; pass ckpt_path=<file.ckpt> or a run dir with checkpoints/")
    return found[0].resolve()


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint read by torch's safe unpickler: tensors, numbers, strings and containers, which
    is all this project saves. A file that needs anything else could run code: refused, in one line."""
    _check_crcs(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = refused_global(err)
        if found is None:  # not a pickle of anything: damaged or not a checkpoint
            raise UserError(
                f"cannot read checkpoint {path}: it is damaged or not a checkpoint; pass another ckpt_path"
            ) from None
        raise UserError(
            f"refusing checkpoint {path}: it holds {found}, which a vae_lightning checkpoint never does "
            "and which could run code when loaded; use a checkpoint written by vae_lightning"
        ) from None
    except Exception as err:  # truncated, damaged, not a checkpoint: torch's first line says which
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise UserError(f"cannot read checkpoint {path}: {reason}; pass another ckpt_path") from None


def _check_crcs(path: str | Path) -> None:
    """torch reads a checkpoint's zip records without checking their CRCs: a tensor damaged on disk
    would load as wrong weights without a word. Checking them costs a few ms per checkpoint.

    The check reads no more than the file holds: ``torch.save`` stores its records uncompressed, so
    a compressed record, or records whose headers add up to more than the file's size, is no
    checkpoint of ours and is refused from the headers, before anything is inflated (a 39 MB file
    can hold a record that inflates to 30 GB)."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            compressed = next((r for r in records if r.compress_type != zipfile.ZIP_STORED), None)
            if compressed is not None:
                raise UserError(
                    f"checkpoint {path} is not a file torch.save writes: its record {compressed.filename} is "
                    f"compressed ({compressed.compress_size:,} bytes that inflate to {compressed.file_size:,}); "
                    "pass a checkpoint written by vae_lightning"
                )
            if sum(r.file_size for r in records) > Path(path).stat().st_size:
                raise UserError(
                    f"checkpoint {path} is damaged: its records claim more bytes than the file holds; "
                    "pass another ckpt_path"
                )
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError):
        return  # not a zip (an old or foreign format): torch.load says what it is
    if damaged is not None:
        raise UserError(f"checkpoint {path} is damaged ({damaged} fails its checksum); pass another ckpt_path")


def check_finite(ckpt: Path, weights: dict) -> None:
    """Weights holding NaN or infinity are refused: they would evaluate to NaN and break the
    figures. (A diverging run never saves such weights: its checkpoints are checked first.)"""
    for name, value in weights.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise UserError(f"the weights in {ckpt} are not finite ({name} holds NaN or infinity); pass another one")


def saved_progress(run_dir: str | Path, requeued: bool = False) -> str:
    """What ``checkpoints/last.ckpt`` of a stopped run holds, and the command that continues it (or,
    for a job handed to submitit to requeue, that the requeued job continues from it)."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return "no epoch had finished, so there is no checkpoint to continue from"
    try:
        epoch = load_checkpoint(last)["epoch"] + 1
    except (UserError, KeyError) as err:  # worth saying, not worth a second traceback
        return f"{last} could not be read ({type(err).__name__})"
    if requeued:
        return f"{last} keeps epoch {epoch}; submitit requeues the job, and it continues from there"
    return f"{last} keeps epoch {epoch}; continue with ckpt_path={Path(run_dir).resolve()}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their target and renamed into place, and read safely.

    Lightning's own save writes to the system temp dir and moves the file into place; when that
    dir is on another filesystem (a tmpfs /tmp, a cluster's local disk) the move is a copy over
    the old file, so a kill or a full disk mid-copy leaves a truncated ``last.ckpt``, and it drops
    a PermissionError silently (Lightning#21800). Here the old file stays whole until the new one
    is complete and on disk (a power cut keeps one of the two), and every error names the file.
    Loading (``ckpt_path=...``) goes through ``load_checkpoint``: no checkpoint runs code; a
    checkpoint the run already read (``hand_over``) is not read again. Remote paths keep Lightning's
    way of saving."""

    def __init__(self) -> None:
        super().__init__()
        self._read: dict[str, dict[str, Any]] = {}

    def hand_over(self, path: Path, checkpoint: dict[str, Any]) -> None:
        """``checkpoint``, already read from ``path``, is what the next load of ``path`` returns."""
        self._read[str(path)] = checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            with replaced_atomically(path, durable=True) as partial:
                partial.write_bytes(buffer.getbuffer())
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(path)) from err

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if str(path) in self._read and map_location in (None, "cpu"):
            return self._read.pop(str(path))
        return load_checkpoint(path, map_location if map_location is not None else "cpu")


def hand_over(trainer: Any, path: Path, checkpoint: dict[str, Any]) -> None:
    """Let ``trainer``'s checkpoint IO use ``checkpoint`` (read from ``path``) instead of reading it again."""
    io = trainer.strategy.checkpoint_io
    while not isinstance(io, AtomicCheckpointIO) and getattr(io, "checkpoint_io", None) is not None:
        io = io.checkpoint_io  # Lightning's wrappers (async saving) hold the plugin
    if isinstance(io, AtomicCheckpointIO):
        io.hand_over(path, checkpoint)
