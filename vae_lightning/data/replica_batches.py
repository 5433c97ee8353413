"""The batches of same-shaped jobs trained as one model (``training.replicas``): each job's own data
order, binarization and held-out split, stacked as (jobs, images, pixels)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from vae_lightning.data.datamodule import MNISTDataModule, binarize, tensor_loader
from vae_lightning.errors import DataError

# what every job of a group must share: the stacked batches have one shape, and one count
SHAPE_KEYS = ("batch_size", "eval_batch_size", "val_split", "dataset")


class ReplicaBatches:
    """The training and validation batches of ``datamodules`` (one per job), in the order each job
    alone would see them: its seed's permutation of every epoch (torch's sampler, as
    ``tensor_loader``), and with ``binarize=dynamic`` its draws from its own generator, where a job
    alone draws from the global one. Jobs with the same data protocol share one copy of the images."""

    def __init__(self, datamodules: Sequence[MNISTDataModule], device: torch.device) -> None:
        first = datamodules[0]
        for dm in datamodules[1:]:
            for key in SHAPE_KEYS:
                if getattr(dm, key) != getattr(first, key):
                    raise DataError(f"jobs trained as one model share data.{key} (here {getattr(first, key)} and "
                                    f"{getattr(dm, key)}): sweep it in separate runs")  # fmt: skip
        loaded: dict[str, MNISTDataModule] = {}
        for dm in datamodules:
            key = repr(sorted(dm.protocol().items()))
            if key in loaded:  # the same images: one copy
                same = loaded[key]
                dm.train_x, dm.val_x, dm.test_x, dm.test_y = same.train_x, same.val_x, same.test_x, same.test_y
            else:
                dm.prepare_data()
                dm.setup()
                dm.train_x, dm.val_x, dm.test_x = (t.to(device) for t in (dm.train_x, dm.val_x, dm.test_x))
                loaded[key] = dm
        self.datamodules = list(datamodules)
        self.device = device
        self.batch_size, self.eval_batch_size = first.batch_size, first.eval_batch_size
        self.dynamic = [dm.binarize == "dynamic" for dm in datamodules]

    def _shared(self, split: str) -> Tensor | None:
        tensors = {id(getattr(dm, split)) for dm in self.datamodules}
        return getattr(self.datamodules[0], split) if len(tensors) == 1 else None

    def train_steps(self) -> int:
        return -(-len(self.datamodules[0].train_x) // self.batch_size)

    def train(self, epoch: int, generators: Sequence[torch.Generator], limit: int | None = None) -> Iterator[Tensor]:
        """Epoch ``epoch``'s training batches (jobs, images, pixels), ``limit`` of them at most."""
        orders = []
        for dm in self.datamodules:
            sampler = tensor_loader(dm.train_x, dm.batch_size, True, dm.seed, 0, 1).sampler
            sampler.set_epoch(epoch)  # as Lightning sets it for a job alone
            orders.append(torch.as_tensor(list(sampler), device=self.device))
        order = torch.stack(orders)
        shared = self._shared("train_x")
        for step, start in enumerate(range(0, order.shape[1], self.batch_size)):
            if limit is not None and step >= limit:
                return
            index = order[:, start : start + self.batch_size]
            if shared is not None:  # one gather for every job
                x = shared[index]
            else:
                x = torch.stack([dm.train_x[i] for dm, i in zip(self.datamodules, index, strict=True)])
            if any(self.dynamic):
                x = torch.stack([binarize(x[j], generators[j]) if dynamic else x[j]
                                 for j, dynamic in enumerate(self.dynamic)])  # fmt: skip
            yield x

    def evaluate(self, split: str = "val_x", limit: int | None = None) -> Iterator[tuple[Tensor, int | None]]:
        """Batches of the validation (or test, ``test_x``) images, in order: (images, None) when every
        job has the same ones (one tensor for all), else (jobs, images, pixels) and 0."""
        shared = self._shared(split)
        n = len(getattr(self.datamodules[0], split))
        for step, start in enumerate(range(0, n, self.eval_batch_size)):
            if limit is not None and step >= limit:
                return
            end = start + self.eval_batch_size
            if shared is not None:
                yield shared[start:end], None
            else:
                yield torch.stack([getattr(dm, split)[start:end] for dm in self.datamodules]), 0
