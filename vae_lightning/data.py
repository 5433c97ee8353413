"""MNIST: finding and checking the files, and flattened [0, 1] tensors held on the training device."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import zlib
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets

from vae_lightning.errors import DataError
from vae_lightning.outputs import replaced_atomically

# name -> (bytes, md5) of the uncompressed files torchvision keeps in <data_dir>/MNIST/raw
MNIST_FILES = {
    "train-images-idx3-ubyte": (47040016, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (60008, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (7840016, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (10008, "27ae3e4e09519cfbb04c329615203637"),
}
POINT_ELSEWHERE = "set data.data_dir=<dir> or VAE_DATA_DIR=<dir> to a folder holding MNIST/raw/"


def default_data_dir() -> Path:
    """``$VAE_DATA_DIR`` if set, else ``data/`` beside the package (the repo's own)."""
    env = os.environ.get("VAE_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data"


def ensure_mnist(data_dir: str | Path, download: bool = True, verify_checksums: bool = True) -> Path:
    """Make sure the four MNIST files are in ``data_dir/MNIST/raw`` and intact; return that dir."""
    raw = Path(data_dir).expanduser().resolve() / "MNIST" / "raw"
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    for name in [m for m in missing if (raw / f"{m}.gz").is_file()]:  # as many mirrors ship them
        _gunzip(raw / f"{name}.gz", raw / name)
        missing.remove(name)
    if missing and download:
        _download(raw.parent.parent)
        missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if missing:
        raise DataError(
            f"MNIST not found: {', '.join(missing)} missing in {raw} "
            f"(download {'failed' if download else 'disabled'}); {POINT_ELSEWHERE}"
        )
    for name, (size, md5) in MNIST_FILES.items():
        path = raw / name
        actual = path.stat().st_size
        if actual != size:
            raise DataError(
                f"MNIST file {path} has {actual} bytes, expected {size} (truncated or wrong file); "
                f"delete it to download it again, or {POINT_ELSEWHERE}"
            )
        if verify_checksums and hashlib.md5(path.read_bytes()).hexdigest() != md5:
            raise DataError(
                f"MNIST file {path} is corrupt (md5 mismatch); delete it to download it again, or {POINT_ELSEWHERE}"
            )
    return raw


def _gunzip(archive: Path, target: Path) -> None:
    try:
        with gzip.open(archive) as source, replaced_atomically(target) as partial, partial.open("wb") as out:
            shutil.copyfileobj(source, out)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"MNIST archive {archive} cannot be decompressed ({err}); delete it to download it again, or "
            f"{POINT_ELSEWHERE}"
        ) from None


def _download(root: Path) -> None:
    print(f"Downloading MNIST into {root / 'MNIST' / 'raw'} ...", flush=True)
    chatter = io.StringIO()  # torchvision prints each failed mirror; we report once
    try:
        with contextlib.redirect_stdout(chatter):
            for train in (True, False):
                datasets.MNIST(str(root), train=train, download=True)
    except Exception as err:  # offline, mirror down, disk full: all end the same way
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(err).__name__
        raise DataError(
            f"could not download MNIST into {root / 'MNIST' / 'raw'} ({reason}); {POINT_ELSEWHERE}"
        ) from err


def load_split(data_dir: str | Path, train: bool) -> tuple[Tensor, Tensor]:
    """Images as float32 (N, 784) in [0, 1], exactly what ``ToTensor()`` + flatten gives, and labels."""
    ds = datasets.MNIST(str(data_dir), train=train, download=False)
    return ds.data.reshape(len(ds.data), -1).float().div_(255), ds.targets.clone()


class TensorImages(Dataset):
    """The images of one split as a device-resident tensor; a batch is one indexing operation
    (``__getitems__``), not a collate of per-image samples."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]

    def __getitems__(self, indices: list[int]) -> Tensor:
        return self.images[torch.as_tensor(indices, device=self.images.device)]


def _as_batch(batch: Tensor) -> Tensor:  # __getitems__ already made the batch
    return batch


def tensor_loader(images: Tensor, batch_size: int, shuffle: bool, seed: int, rank: int, world_size: int) -> DataLoader:
    """Batches of ``images`` in the order of torch's ``DistributedSampler``: a permutation seeded by
    (seed, epoch), padded and sharded by rank (one shard on one process). Lightning sets its epoch,
    so a resumed run sees the same order as an uninterrupted one; the last partial batch is kept,
    as the reference notebook's DataLoader keeps it."""
    sampler = DistributedSampler(TensorImages(images), world_size, rank, shuffle=shuffle, seed=seed)
    # each iterator draws a seed for worker processes (there are none) from `generator`: from the
    # global one, it would shift every later reparameterisation draw of the run
    private = torch.Generator().manual_seed(seed)
    return DataLoader(sampler.dataset, batch_size=batch_size, sampler=sampler, collate_fn=_as_batch, generator=private)


class MNISTDataModule(L.LightningDataModule):
    """Train on the 60k training images; validate and test on the official 10k test set."""

    class_names = [str(digit) for digit in range(10)]  # what the figures call each label

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        seed: int = 0,
        download: bool = True,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.download = seed, download
        self.train_x: Tensor | None = None
        self.test_x: Tensor | None = None
        self.test_y: Tensor | None = None
        self.checked = False  # the files were found and their checksums verified in this process

    def prepare_data(self) -> None:
        if not self.checked:
            ensure_mnist(self.data_dir, self.download)
            self.checked = True

    def setup(self, stage: str | None = None) -> None:
        if self.test_x is not None:
            return
        if not self.checked:  # DDP ranks other than local rank 0 do not run prepare_data
            ensure_mnist(self.data_dir, download=False)
            self.checked = True
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        self.train_x = load_split(self.data_dir, train=True)[0].to(device)
        test_x, self.test_y = load_split(self.data_dir, train=False)
        self.test_x = test_x.to(device)

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        return tensor_loader(self.train_x, self.batch_size, True, self.seed, *self._rank())

    def val_dataloader(self) -> DataLoader:
        return tensor_loader(self.test_x, self.eval_batch_size, False, self.seed, *self._rank())

    test_dataloader = val_dataloader
