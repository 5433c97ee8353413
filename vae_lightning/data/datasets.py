"""MNIST and Fashion-MNIST on disk: where the files are, whether they are whole (sizes, md5),
fetching them through torchvision when missing, and reading a split as flat [0, 1] tensors."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor
from torchvision import datasets

from vae_lightning.errors import DataError
from vae_lightning.outputs import replaced_atomically
from vae_lightning.registry import Registry

# name -> (bytes, md5) of the uncompressed files torchvision keeps in <data_dir>/<folder>/raw
MNIST_FILES = {
    "train-images-idx3-ubyte": (47040016, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (60008, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (7840016, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (10008, "27ae3e4e09519cfbb04c329615203637"),
}
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte": (47040016, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": (60008, "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": (7840016, "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": (10008, "15d484375f8d13e6eb1aabb0c3f46965"),
}


@dataclass(frozen=True)
class Source:
    """One dataset: what it is called, torchvision's class and folder, its files, its classes."""

    title: str
    torchvision_class: type
    files: dict[str, tuple[int, str]]
    class_names: tuple[str, ...]
    label_name: str  # what one label is called in figures: "digit", "class"

    @property
    def folder(self) -> str:  # torchvision's: <data_dir>/MNIST/raw, <data_dir>/FashionMNIST/raw
        return self.torchvision_class.__name__


# data.dataset's choices; a plugin adds a torchvision dataset of MNIST's format as a Source in the
# vae_lightning.datasets entry-point group (docs/plugins.md)
SOURCES: Registry[Source] = Registry("dataset", "data.dataset")
SOURCES.register("mnist")(
    Source("MNIST", datasets.MNIST, MNIST_FILES, tuple(str(digit) for digit in range(10)), "digit")
)
SOURCES.register("fashion_mnist")(
    Source("Fashion-MNIST", datasets.FashionMNIST, FASHION_MNIST_FILES, tuple(datasets.FashionMNIST.classes), "class")
)


def source(dataset: str) -> Source:
    try:
        return SOURCES.get(dataset)
    except ValueError as err:  # an unknown name, or a plugin's that fails to load
        raise DataError(str(err)) from None


def _point_elsewhere(src: Source) -> str:
    return f"set data.data_dir=<dir> or VAE_DATA_DIR=<dir> to a folder holding {src.folder}/raw/"


def default_data_dir() -> Path:
    """``$VAE_DATA_DIR`` if set, else ``data/`` beside the package (the repo's own)."""
    env = os.environ.get("VAE_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data"


def ensure_dataset(
    data_dir: str | Path, dataset: str = "mnist", download: bool = True, verify_checksums: bool = True
) -> Path:
    """Make sure the dataset's four files are in ``data_dir/<folder>/raw`` and intact; return that dir.
    A data dir or file this user cannot read (no permission, a symlink loop) is one line naming it."""
    src = source(dataset)
    try:
        return _ensure(src, Path(data_dir).expanduser().resolve() / src.folder / "raw", download, verify_checksums)
    except (OSError, RuntimeError) as err:  # reading (writes say their own); RuntimeError: pathlib's "Symlink loop"
        where = getattr(err, "filename", None) or data_dir
        reason = getattr(err, "strerror", None) or str(err)
        raise DataError(
            f"cannot read {src.title} at {where}: {reason}; make it readable by this user, or {_point_elsewhere(src)}"
        ) from None


def _ensure(src: Source, raw: Path, download: bool, verify_checksums: bool) -> Path:
    missing = [name for name in src.files if not (raw / name).is_file()]
    for name in [m for m in missing if (raw / f"{m}.gz").is_file()]:  # as many mirrors ship them
        _gunzip(src, raw / f"{name}.gz", raw / name)
        missing.remove(name)
    if missing and download:
        _download(src, raw.parent.parent)
        missing = [name for name in src.files if not (raw / name).is_file()]
    if missing:
        raise DataError(
            f"{src.title} not found: {', '.join(missing)} missing in {raw} "
            f"(download {'failed' if download else 'disabled'}); {_point_elsewhere(src)}"
        )
    for name, (size, md5) in src.files.items():
        path = raw / name
        actual = path.stat().st_size
        if actual != size:
            raise DataError(
                f"{src.title} file {path} has {actual} bytes, expected {size} (truncated or wrong file); "
                f"delete it to download it again, or {_point_elsewhere(src)}"
            )
        if verify_checksums and hashlib.md5(path.read_bytes()).hexdigest() != md5:
            raise DataError(
                f"{src.title} file {path} is corrupt (md5 mismatch); delete it to download it again, "
                f"or {_point_elsewhere(src)}"
            )
    return raw


def _gunzip(src: Source, archive: Path, target: Path) -> None:
    try:
        with gzip.open(archive) as source, replaced_atomically(target) as partial, partial.open("wb") as out:
            shutil.copyfileobj(source, out)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{src.title} archive {archive} cannot be decompressed ({err}); delete it to download it again, "
            f"or {_point_elsewhere(src)}"
        ) from None


def _download(src: Source, root: Path) -> None:
    print(f"Downloading {src.title} into {root / src.folder / 'raw'} ...", flush=True)
    chatter = io.StringIO()  # torchvision prints each failed mirror; we report once
    made = [d for d in (root, root / src.folder, root / src.folder / "raw") if not d.exists()]
    try:
        with contextlib.redirect_stdout(chatter):
            for train in (True, False):
                src.torchvision_class(str(root), train=train, download=True)
    except Exception as err:  # offline, mirror down, disk full: all end the same way
        for folder in reversed(made):  # leave no empty folders behind (they would look like a dataset)
            with contextlib.suppress(OSError):
                folder.rmdir()
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(err).__name__
        raise DataError(
            f"could not download {src.title} into {root / src.folder / 'raw'} ({reason}); {_point_elsewhere(src)}"
        ) from err


def load_split(data_dir: str | Path, train: bool, dataset: str = "mnist") -> tuple[Tensor, Tensor]:
    """Images as float32 (N, 784) in [0, 1], exactly what ``ToTensor()`` + flatten gives, and labels."""
    ds = source(dataset).torchvision_class(str(data_dir), train=train, download=False)
    return ds.data.reshape(len(ds.data), -1).float().div_(255), ds.targets.clone()
