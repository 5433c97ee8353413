"""The DataModule: MNIST or Fashion-MNIST (``datasets``) as flattened [0, 1] tensors held on the
training device, batched in torch's sampler order, and the binarization protocols."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vae_lightning.data.datasets import default_data_dir, ensure_dataset, load_split, source
from vae_lightning.errors import DataError

# none: the reference notebook's continuous pixels; dynamic: every training use of an image draws
# x ~ Bernoulli(pixel) anew (Burda et al. 2015); static: one fixed draw of the training set
BINARIZE = ("none", "dynamic", "static")


def binarize(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x ~ Bernoulli(images), as 0.0/1.0 in float32, on the images' device (from ``generator``, else
    that device's global generator).

    Hand-written because ``torch.bernoulli`` costs ~1.3 ms for a 128-image batch on a CPU (a fifth
    of a training step): one 64-bit draw gives four 16-bit uniforms u, and x = [u < 65536 p], so
    P(x = 1) is p rounded up to a multiple of 2^-16 (0 and 1 exactly): ~0.2 ms a batch.
    """
    words = torch.randint(
        -(2**63), 2**63 - 1, (math.ceil(images.numel() / 4),), dtype=torch.int64, device=images.device,
        generator=generator,
    )  # fmt: skip
    uniform = words.view(torch.int16)[: images.numel()].view(images.shape)  # in [-32768, 32767]
    # x = [u < 65536 p - 32768], written as [(65536 p - 32768) - u > 0] in place on one float
    # tensor (fewer passes and allocations than a comparison and a cast); the difference is
    # exact in float32, so every draw is the comparison's
    return images.float().mul(65536).sub_(32768).sub_(uniform).gt_(0)


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
    """MNIST or Fashion-MNIST (``dataset``) under one of the ``BINARIZE`` protocols: train on the
    60k training images and test on the official 10k test set.

    Validation (the per-epoch val/* and the choice of the best checkpoint) runs on the test set, as
    the reference notebook's per-epoch test loop does, unless ``val_split`` holds out that many
    training images for it: the last ones of the training file (MNIST's customary 50k/10k split
    at 10,000), never trained on.

    With ``binarize`` dynamic or static, the test set is one draw with ``binarize_seed``, made on
    the CPU: every run, on any device, is evaluated on the same 0/1 images. The training set has
    one draw too (``binarize_seed + 1``): ``static`` trains on it, and the held-out validation
    images are their part of it in both modes. ``dynamic`` draws every training batch anew on the
    device, from the global generator, whose state checkpoints keep, so a resumed run draws what
    an uninterrupted one would.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        dataset: str = "mnist",
        binarize: str = "none",
        binarize_seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        seed: int = 0,
        download: bool = True,
        val_split: int = 0,
    ) -> None:
        super().__init__()
        if binarize not in BINARIZE:
            raise DataError(f"data.binarize={binarize!r} is not one of {', '.join(BINARIZE)}")
        if not isinstance(val_split, int) or val_split < 0:
            raise DataError(f"data.val_split={val_split!r}: give a number of training images to hold out, or 0")
        self.source = source(dataset)
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.dataset, self.binarize, self.binarize_seed = dataset, binarize, binarize_seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.download, self.val_split = seed, download, val_split
        self.train_x: Tensor | None = None
        self.val_x: Tensor | None = None  # the test set unless val_split holds out training images
        self.test_x: Tensor | None = None
        self.test_y: Tensor | None = None
        self.checked = False  # the files were found and their checksums verified in this process

    @property
    def class_names(self) -> list[str]:  # what the figures call each label
        return list(self.source.class_names)

    @property
    def label_name(self) -> str:  # and what they call a label
        return self.source.label_name

    def protocol(self) -> dict[str, str | int]:
        """What the weights were trained and are evaluated on; kept in every checkpoint."""
        protocol: dict[str, str | int] = {"dataset": self.dataset, "binarize": self.binarize}
        if self.binarize != "none":
            protocol["binarize_seed"] = self.binarize_seed
        if self.val_split:
            protocol["val_split"] = self.val_split
        return protocol

    def state_dict(self) -> dict[str, str | int]:
        return self.protocol()

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # a continued run keeps today's settings; train.py says which differ

    def prepare_data(self) -> None:
        if not self.checked:
            ensure_dataset(self.data_dir, self.dataset, self.download)
            self.checked = True

    def setup(self, stage: str | None = None) -> None:
        if self.test_x is not None:
            return
        if not self.checked:  # DDP ranks other than local rank 0 do not run prepare_data
            ensure_dataset(self.data_dir, self.dataset, download=False)
            self.checked = True
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        train_x = load_split(self.data_dir, True, self.dataset)[0]
        test_x, self.test_y = load_split(self.data_dir, False, self.dataset)
        if self.val_split >= len(train_x):
            raise DataError(
                f"data.val_split={self.val_split} would leave nothing to train on: "
                f"{self.source.title} has {len(train_x)} training images; hold out fewer (e.g. 10000)"
            )
        drawn = train_x
        if self.binarize != "none":
            test_x = binarize(test_x, torch.Generator().manual_seed(self.binarize_seed))
            if self.binarize == "static" or self.val_split:
                drawn = binarize(train_x, torch.Generator().manual_seed(self.binarize_seed + 1))
        if self.binarize == "static":
            train_x = drawn
        kept = len(train_x) - self.val_split
        val_x = drawn[kept:] if self.val_split else test_x
        self.train_x, self.val_x, self.test_x = train_x[:kept].to(device), val_x.to(device), test_x.to(device)

    def on_after_batch_transfer(self, batch: Tensor, dataloader_idx: int) -> Tensor:
        if self.binarize == "dynamic" and self.trainer is not None and self.trainer.training:
            return binarize(batch)
        return batch

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        return tensor_loader(self.train_x, self.batch_size, True, self.seed, *self._rank())

    def val_dataloader(self) -> DataLoader:
        return tensor_loader(self.val_x, self.eval_batch_size, False, self.seed, *self._rank())

    def test_dataloader(self) -> DataLoader:
        return tensor_loader(self.test_x, self.eval_batch_size, False, self.seed, *self._rank())
