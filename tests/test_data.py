import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets, transforms

from vae_lightning.data.datamodule import MNISTDataModule, tensor_loader
from vae_lightning.data.datasets import MNIST_FILES, ensure_dataset
from vae_lightning.errors import DataError
from vae_lightning.outputs import describe_disk_error


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    dm = MNISTDataModule(str(mnist_dir), batch_size=128, seed=0, download=False)
    dm.checked = True  # mnist_dir checked the sizes; the checksums are test_truncated_and_corrupt_files's
    dm.setup("fit")
    return dm


def test_real_mnist_is_flattened_to_784_floats_in_unit_range(mnist):
    assert mnist.train_x.shape == (60000, 784) and mnist.test_x.shape == (10000, 784)
    assert mnist.train_x.dtype == torch.float32
    assert mnist.train_x.min() == 0.0 and mnist.train_x.max() == 1.0
    assert mnist.test_y.shape == (10000,) and set(mnist.test_y.tolist()) == set(range(10))


def test_pixels_equal_the_seed_transform(mnist, mnist_dir):
    seed_transform = transforms.Compose([transforms.ToTensor(), transforms.Lambda(lambda x: x.view(-1))])
    seed_ds = datasets.MNIST(str(mnist_dir), train=True, transform=seed_transform)
    for i in (0, 1, 12345, 59999):
        assert torch.equal(seed_ds[i][0], mnist.train_x[i])


def test_train_batches_cover_the_set_once_and_keep_the_last_partial_batch(mnist):
    loader = mnist.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 469
    assert {b.shape[0] for b in batches[:-1]} == {128} and batches[-1].shape == (60000 - 468 * 128, 784)
    sums = torch.cat(batches).sum(1).double()
    assert torch.allclose(sums.sort().values, mnist.train_x.sum(1).double().sort().values)


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int = 0, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The image indices the training loader yields in one epoch."""
    loader = tensor_loader(torch.arange(float(n)), 64, shuffle, seed, rank, world_size)
    loader.sampler.set_epoch(epoch)  # as Lightning does at every epoch start
    return torch.cat(list(loader)).long()


def test_shuffles_are_deterministic_per_seed_and_epoch():
    first = epoch_order(1000, True, seed=0)
    assert torch.equal(first, epoch_order(1000, True, seed=0))
    assert not torch.equal(first, epoch_order(1000, True, seed=0, epoch=1))
    assert torch.equal(epoch_order(1000, True, seed=0, epoch=1), epoch_order(1000, True, seed=0, epoch=1))
    assert not torch.equal(epoch_order(1000, True, seed=1), first)
    assert torch.equal(first.sort().values, torch.arange(1000))
    assert torch.equal(epoch_order(1000, False, seed=0), torch.arange(1000))


def test_the_order_is_seed_plus_epoch_as_in_the_reference_permutation():
    """A resumed run must see the order an uninterrupted one saw: randperm seeded by seed + epoch."""
    expected = torch.randperm(1000, generator=torch.Generator().manual_seed(7 + 3))
    assert torch.equal(epoch_order(1000, True, seed=7, epoch=3), expected)


def test_shards_partition_the_permutation():
    shards = [epoch_order(1000, True, seed=3, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(1000))


def test_uneven_shards_are_padded_to_the_same_number_of_batches():
    # 1001 images on 2 ranks in batches of 500 would be 2 and 1 batches: DDP would wait forever
    images = torch.arange(1001.0)
    loaders = [tensor_loader(images, 500, True, 3, r, 2) for r in range(2)]
    assert [len(loader) for loader in loaders] == [2, 2]
    shards = [torch.cat(list(loader)).long() for loader in loaders]
    assert [len(s) for s in shards] == [501, 501]
    assert torch.equal(torch.cat(shards).unique(), torch.arange(1001))  # every image, one repeated


def test_validation_batches_are_the_test_set_in_order(mnist):
    batches = list(mnist.val_dataloader())
    assert torch.equal(torch.cat(batches), mnist.test_x)


def test_batches_follow_the_tensor_device():
    images = torch.rand(10, 784)
    loader = tensor_loader(images, 4, True, 0, 0, 1)
    assert [b.shape[0] for b in loader] == [4, 4, 2]
    assert all(b.device == images.device for b in loader)


def test_missing_data_offline_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"MNIST not found: train-images-idx3-ubyte.*missing in .*data\.data_dir"):
        ensure_dataset(tmp_path, download=False)
    # a download that cannot connect ends the same way, naming the folder
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataError, match=r"could not download MNIST into .*VAE_DATA_DIR"):
        ensure_dataset(tmp_path, download=True)


def _copy_of_mnist(src: Path, dst: Path) -> Path:
    raw = dst / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        os.symlink(src / "MNIST" / "raw" / name, raw / name)
    return raw


@pytest.mark.slow  # checksums all of MNIST
def test_truncated_and_corrupt_files_are_named(tmp_path, mnist_dir):
    raw = _copy_of_mnist(mnist_dir, tmp_path)
    name = "t10k-labels-idx1-ubyte"
    data = (mnist_dir / "MNIST" / "raw" / name).read_bytes()
    (raw / name).unlink()
    (raw / name).write_bytes(data[:5000])
    with pytest.raises(DataError, match=rf"{name} has 5000 bytes, expected 10008.*delete it"):
        ensure_dataset(tmp_path, download=False)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    (raw / name).write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=rf"{name} is corrupt \(md5 mismatch\)"):
        ensure_dataset(tmp_path, download=False)
    assert np.frombuffer(data[8:], np.uint8).max() == 9  # the original is untouched


def test_a_data_dir_that_is_a_symlink_loop_is_one_clear_error(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(DataError, match=rf"^cannot read MNIST at {loop}: .*[Ss]ymlink loop.*; make it readable by "):
        ensure_dataset(loop, download=False)


def test_a_data_file_this_user_cannot_read_says_reading_not_writing(tmp_path, mnist_dir, monkeypatch):
    raw = mnist_dir / "MNIST" / "raw"
    unreadable = raw / "train-images-idx3-ubyte"
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:  # as chmod 000 would for anyone but root (the tests may run as root)
        if path == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError) as err:
        ensure_dataset(mnist_dir, download=False)
    assert str(err.value) == (
        f"cannot read MNIST at {unreadable}: Permission denied; make it readable by this user, or set "
        "data.data_dir=<dir> or VAE_DATA_DIR=<dir> to a folder holding MNIST/raw/"
    )
    # the same error met later, outside the run dir (torchvision opening the file), is not a write either
    said = describe_disk_error(PermissionError(errno.EACCES, "Permission denied", str(unreadable)), tmp_path / "r")
    assert said == f"Permission denied: {unreadable}; make it readable by this user, or point the run elsewhere"
    inside = tmp_path / "logs" / "train" / "run" / "metrics.json"
    said = describe_disk_error(PermissionError(errno.EACCES, "Permission denied", str(inside)), inside.parent)
    assert said == f"Permission denied writing {inside}; set paths.log_dir=<a writable directory>"
