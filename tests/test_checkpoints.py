"""No checkpoint runs code: every load goes through torch's safe unpickler."""

import os
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from vae_lightning.building import module_from_checkpoint
from vae_lightning.checkpoints import AtomicCheckpointIO, find_checkpoint, load_checkpoint
from vae_lightning.errors import UserError
from vae_lightning.model import VAE
from vae_lightning.module import VAEModule


class CreatesAFile:
    """Unpickling this would run ``touch <path>``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def crafted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "shared.ckpt"
    state = {"state_dict": VAEModule().state_dict(), "hyper_parameters": {"latent_dim": 20, "x": CreatesAFile(marker)}}
    torch.save(state, ckpt)
    return ckpt, marker


REFUSAL = "refusing checkpoint {ckpt}: it holds posix.system, which a vae_lightning checkpoint never does"


def test_a_checkpoint_holding_code_is_refused_before_it_runs(tmp_path):
    ckpt, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(UserError, match=REFUSAL.format(ckpt=ckpt)):
        load_checkpoint(ckpt)
    with pytest.raises(UserError, match="refusing checkpoint"):
        AtomicCheckpointIO().load_checkpoint(ckpt)  # what Lightning calls for ckpt_path=...
    assert not marker.exists()


def test_our_own_checkpoints_load_safely(tmp_path):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    module = VAEModule.from_settings(latent_dim=3)
    AtomicCheckpointIO().save_checkpoint({"state_dict": module.state_dict(), "epoch": 4}, ckpt)
    loaded = load_checkpoint(ckpt)
    assert loaded["epoch"] == 4
    assert torch.equal(loaded["state_dict"]["model.fc_mu.bias"], module.model.encoder.fc_mu.bias)
    assert find_checkpoint(tmp_path, "last") == ckpt.resolve() == find_checkpoint(tmp_path, "best")


def test_a_damaged_or_foreign_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match=rf"cannot read checkpoint {bad}: .*; pass another ckpt_path"):
        load_checkpoint(bad)


@pytest.mark.slow
def test_the_cli_refuses_a_checkpoint_holding_code_for_eval_and_for_continuing(tmp_path):
    ckpt, marker = crafted_checkpoint(tmp_path)
    for module, out in (("vae_lightning.eval", "eval"), ("vae_lightning.train", "train")):
        result = run_cli(module, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / out}")
        assert result.returncode == 1, module
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("error: " + REFUSAL.format(ckpt=ckpt)), module
    assert not marker.exists()


def test_a_checkpoint_damaged_on_disk_is_refused(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": VAEModule().state_dict()}, ckpt)
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a weight tensor
    ckpt.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"checkpoint {ckpt} is damaged \(archive/data/\d+ fails its checksum\)"):
        load_checkpoint(ckpt)


def test_a_record_that_inflates_is_refused_from_its_header_before_inflating(tmp_path):
    ckpt = tmp_path / "inflating.ckpt"
    torch.save({"state_dict": VAEModule().state_dict()}, ckpt)
    with zipfile.ZipFile(ckpt, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/99", bytes(200 << 20))  # 200 MB of zeros in about 200 KB
    assert ckpt.stat().st_size < 4 << 20
    inflated = []
    real_read = zipfile.ZipExtFile.read
    with pytest.MonkeyPatch.context() as patch:  # whether the check inflates anything
        patch.setattr(zipfile.ZipExtFile, "read", lambda self, n=-1: inflated.append(n) or real_read(self, n))
        with pytest.raises(
            UserError,
            match=rf"checkpoint {ckpt} is not a file torch.save writes: its record "
            r"archive/data/99 is compressed \(\d[\d,]* bytes that inflate to 209,715,200\)",
        ):
            load_checkpoint(ckpt)
    assert inflated == []


@pytest.mark.slow
def test_the_cli_refuses_an_inflating_checkpoint_in_one_line(tmp_path):
    ckpt = tmp_path / "inflating.ckpt"
    torch.save({"state_dict": VAEModule().state_dict()}, ckpt)
    with zipfile.ZipFile(ckpt, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/99", bytes(50 << 20))
    for module, out in (("vae_lightning.eval", "eval"), ("vae_lightning.train", "train")):
        result = run_cli(module, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / out}")
        assert result.returncode == 1, module
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"error: checkpoint {ckpt} is not a file torch.save writes"), (module, line)


def test_the_reference_notebooks_state_dict_is_evaluated_as_is(tmp_path):
    reference = VAE({"hidden": [50]}, latent_dim=3)  # its layer names are ours
    path = tmp_path / "vae.pth"
    torch.save(reference.state_dict(), path)
    module = module_from_checkpoint(path)
    assert module.model.settings["net"]["hidden"] == [50] and module.model.latent_dim == 3
    for key, value in reference.state_dict().items():
        assert torch.equal(module.model.state_dict()[key], value), key
    torch.save({"something": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="is neither a vae_lightning checkpoint nor a VAE state_dict"):
        module_from_checkpoint(path)


def test_a_checkpoints_strings_are_data_not_config(tmp_path, monkeypatch):
    from helpers import compose_config

    from vae_lightning.building import trained_data

    monkeypatch.setenv("VAE_TEST_SECRET", "do-not-print")
    data_cfg = compose_config("eval", tmp_path, "ckpt_path=x").data
    for protocol in ({"dataset": "${oc.env:VAE_TEST_SECRET}"}, {"binarize": "${oc.env:VAE_TEST_SECRET}"},
                     {"binarize_seed": "7"}):  # fmt: skip
        with pytest.raises(UserError, match="is not a setting of this project") as caught:
            trained_data(protocol, data_cfg)
        assert "do-not-print" not in str(caught.value)
    assert trained_data({"dataset": "fashion_mnist", "binarize": "dynamic"}, data_cfg).binarize == "dynamic"
