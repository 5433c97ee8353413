"""No checkpoint runs code: every load goes through torch's safe unpickler."""

import os
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import run_cli, run_in_one_interpreter

from vae_lightning.errors import UserError
from vae_lightning.model.vae import VAE
from vae_lightning.runs.building import module_from_checkpoint
from vae_lightning.training.checkpoints import AtomicCheckpointIO, find_checkpoint, load_checkpoint
from vae_lightning.training.module import VAEModule


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
    with pytest.raises(
        UserError, match="neither a vae_lightning checkpoint nor the reference notebook's VAE state_dict"
    ):
        module_from_checkpoint(path)


def test_a_checkpoints_strings_are_data_not_config(tmp_path, monkeypatch):
    from helpers import compose_config

    from vae_lightning.runs.building import trained_data

    monkeypatch.setenv("VAE_TEST_SECRET", "do-not-print")
    data_cfg = compose_config("eval", tmp_path, "ckpt_path=x").data
    for protocol in ({"dataset": "${oc.env:VAE_TEST_SECRET}"}, {"binarize": "${oc.env:VAE_TEST_SECRET}"},
                     {"binarize_seed": "7"}):  # fmt: skip
        with pytest.raises(UserError, match="is not a setting of this project") as caught:
            trained_data(protocol, data_cfg)
        assert "do-not-print" not in str(caught.value)
    assert trained_data({"dataset": "fashion_mnist", "binarize": "dynamic"}, data_cfg).binarize == "dynamic"


def wrong_kinds_of_file(real: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Files a user may hand any entry point instead of a checkpoint of this project, each with the
    words its one-line refusal must hold. ``real`` is a checkpoint written by train."""
    from safetensors.torch import save_file

    folder.mkdir()
    base = torch.load(real, weights_only=True)
    files: dict[str, tuple[Path, str]] = {}

    def save(name: str, obj, says: str) -> None:
        torch.save(obj, folder / name)
        files[name] = (folder / name, says)

    other = {"epoch": 0, "global_step": 0, "state_dict": {"layer.weight": torch.zeros(3, 3)},
             "hyper_parameters": {"hidden": 3}, "loops": {}, "callbacks": {}, "optimizer_states": []}  # fmt: skip
    save("other_project.ckpt", other, "not a vae_lightning")
    save_file({"w": torch.zeros(3)}, folder / "weights.safetensors")
    files["weights.safetensors"] = (folder / "weights.safetensors", "vae_lightning")
    save("tensor.ckpt", torch.zeros(3), "vae_lightning")
    save("list.ckpt", [1, 2], "vae_lightning")
    nan = {**base, "state_dict": {k: v.clone() for k, v in base["state_dict"].items()}}
    next(iter(nan["state_dict"].values())).fill_(float("nan"))
    save("nan_weights.ckpt", nan, "are not finite")
    for key, value, says in (("latent_dim", "20", "model.latent_dim='20' must be an integer"),
                             ("objective", "nonsense", "the objective 'nonsense', which no installed package provides"),
                             # a string OmegaConf would resolve stays a string: the refusal quotes it
                             ("init", "${oc.env:HOME}", "model.init='${oc.env:HOME}' is not one of"),
                             ("lr", "${oc.env:HOME}", "model.lr='${oc.env:HOME}' must be a number > 0")):  # fmt: skip
        hparams = {**base["hyper_parameters"], "vae": dict(base["hyper_parameters"]["vae"])}
        (hparams if key in hparams else hparams["vae"])[key] = value
        save(f"bad_{key}.ckpt", {**base, "hyper_parameters": hparams}, says)
    return files


@pytest.mark.slow
def test_every_entry_point_refuses_a_wrong_kind_of_file_in_one_line(trained_run, tmp_path, mnist_dir):
    run_dir, _ = trained_run
    files = wrong_kinds_of_file(run_dir / "checkpoints" / "last.ckpt", tmp_path / "files")
    entry_points = {
        "train": ["trainer.max_epochs=5", f"paths.log_dir={tmp_path / 'logs'}"],
        "eval": ["eval.k=2", f"paths.log_dir={tmp_path / 'logs'}"],
        "report": [f"paths.log_dir={tmp_path / 'logs'}"],
        "export": [f"paths.log_dir={tmp_path / 'logs'}"],
    }
    commands = [
        ["python", "-m", f"vae_lightning.{entry}", f"ckpt_path={path}", f"data.data_dir={mnist_dir}", *extra]
        for path, _ in files.values()
        for entry, extra in entry_points.items()
    ]
    commands = [c if "export" not in c[2] else [w for w in c if not w.startswith("data.")] for c in commands]  # no data
    results = run_in_one_interpreter(commands)
    assert len(results) == len(commands), results[-1:]
    for command, (code, _, error) in zip(commands, results, strict=True):
        name = Path(command[3].split("=", 1)[1]).name
        lines = [line for line in error.strip().splitlines() if line.strip()]
        assert code == 1 and "Traceback" not in error, f"{command}\n{error[-2000:]}"
        assert lines[-1].startswith("error: ") and files[name][1] in lines[-1], f"{command}: {lines[-1]}"
        assert name in lines[-1]  # the line names the file
    assert not list((tmp_path / "logs").glob("*/runs/*"))  # each refused before a run dir was made
