"""Every config composes and every object in it can be built."""

import os
import re

import lightning as L
import pytest
import torch
from helpers import CONF_DIR, compose_config, compose_train, run_in_one_interpreter
from omegaconf import OmegaConf

from vae_lightning.errors import UserError
from vae_lightning.runs.building import build
from vae_lightning.runs.checks import check_hardware, check_new_keys, validate_config
from vae_lightning.training.evaluation import Evaluation
from vae_lightning.workarounds import skip_nvml_probe_without_gpu


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_defaults_are_the_reference_notebook_run(tmp_path):
    cfg = compose_train(tmp_path)
    assert cfg.model.net == {"name": "mlp", "hidden": [400], "activation": "relu"}
    assert cfg.model.latent_dim == 20 and cfg.model.lr == 1e-3
    assert cfg.data.batch_size == 128 and cfg.trainer.max_epochs == 100
    assert cfg.trainer.accelerator == "auto" and cfg.trainer.log_every_n_steps == 1
    assert cfg.model.init == "default" and cfg.seed == 0
    named = compose_train(tmp_path, "experiment=reference_notebook")
    for key in ("model", "data", "trainer", "seed"):
        assert OmegaConf.select(named, key) == OmegaConf.select(cfg, key), key


def test_both_entry_points_build_the_evaluation_from_one_config(tmp_path):
    """conf/eval/: the same Evaluation for train (a cheap k at the end of every run) and eval."""
    at_end = build(compose_train(tmp_path).eval, "eval")
    full = build(compose_config("eval", tmp_path, "ckpt_path=x").eval, "eval")
    assert isinstance(at_end, Evaluation) and isinstance(full, Evaluation)
    assert (at_end.k, full.k) == (100, 5000) and not at_end.ten_samples and full.ten_samples
    assert (at_end.batch_size, at_end.chunk_rows, at_end.scale) == (full.batch_size, full.chunk_rows, full.scale)
    # a training run's bound keeps its progress in its run dir (its continuation comes back there); an
    # eval's in one dir under the log dir, since each eval has a new dir of its own
    assert at_end.progress_dir == tmp_path and full.progress_dir == tmp_path / "eval" / "unfinished_bounds"


@pytest.mark.parametrize(
    "overrides",
    [[f"trainer={o}"] for o in options("trainer") if o != "gpu"]
    + [[f"logger={o}"] for o in options("logger")]
    + [[f"experiment={o}"] for o in options("experiment")]
    + [[f"hparams_search={o}"] for o in options("hparams_search")]
    + [["model.latent_dim=2", "model.init=xavier_normal", "data.batch_size=64"]],
)
def test_every_config_builds(tmp_path, overrides):
    cfg = compose_train(tmp_path, *overrides)
    assert isinstance(build(cfg.data, "data"), L.LightningDataModule)
    module = build(cfg.model, "model")
    assert module.model.latent_dim == cfg.model.latent_dim
    callbacks = [build(node, "callbacks") for node in cfg.callbacks.values()]
    loggers = [build(node, "logger") for node in cfg.logger.values()]
    assert len(loggers) == len(cfg.logger) >= 1
    trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert trainer.log_every_n_steps == 1


@pytest.mark.parametrize("gpu", [False, True])
def test_the_per_step_nvml_probe_is_skipped_only_where_it_finds_no_gpu(monkeypatch, gpu):
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as importing Lightning leaves it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    skip_nvml_probe_without_gpu()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == ("1" if gpu else "0")


def test_skipping_the_nvml_probe_keeps_torchs_answer(monkeypatch):
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    before = torch.cuda.is_available()
    skip_nvml_probe_without_gpu()
    assert torch.cuda.is_available() == before
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == ("1" if before else "0")


def test_gpu_config_composes_and_is_refused_cleanly_without_a_gpu(tmp_path):
    cfg = compose_train(tmp_path, "trainer=gpu")
    assert cfg.trainer.accelerator == "gpu"
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="no CUDA GPU was found.*trainer.accelerator=auto"):
        check_hardware(cfg.trainer)


def test_more_cpu_processes_than_cores_are_refused(tmp_path):
    cores = os.cpu_count()
    cfg = compose_train(tmp_path, "trainer=cpu", f"trainer.devices={cores + 1}")
    with pytest.raises(
        UserError, match=rf"trainer.devices={cores + 1} CPU processes but this machine has {cores} cores"
    ):
        check_hardware(cfg.trainer)
    check_hardware(compose_train(tmp_path, "trainer=ddp", f"trainer.devices={cores}").trainer)


def test_a_bad_value_names_the_group(tmp_path):
    cfg = compose_train(tmp_path, "trainer.precision=17")
    with pytest.raises(UserError, match=r"cannot build the trainer from the config: Precision 17 is invalid"):
        build(cfg.trainer, "trainer")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.latent_dim=0", "model.latent_dim=0 is not valid: it must be an integer >= 1"),
        ("model.lr=-0.1", "model.lr=-0.1 is not valid: it must be a number > 0"),
        ("data.batch_size=0", "data.batch_size=0 is not valid: it must be an integer >= 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 is not valid: it must be an integer >= 1"),
        ("model.latent_dim=2.5", "model.latent_dim=2.5 is not valid: it must be an integer >= 1"),
        ("trainer.max_epochs=null", "trainer.max_epochs=None is not valid: it must be an integer >= 1"),
        ("eval.batch_size=0", "eval.batch_size=0 is not valid: it must be an integer >= 1 (test images per pass)"),
        ("seed=-1", "seed=-1 is not valid: it must be an integer in [0, 2**32)"),
        ("seed=4294967296", "seed=4294967296 is not valid: it must be an integer in [0, 2**32)"),
        ("model.net=conv", "model.net='conv' is not valid: it is a block of settings; choose a net with model/net="),
        ("model.net=null", "model.net=None is not valid: it is a block of settings; choose a net with model/net="),
    ],
)
def test_impossible_values_are_refused_before_anything_is_built(tmp_path, override, message):
    cfg = compose_train(tmp_path, override, "data.data_dir=/nonexistent")  # data is never touched
    with pytest.raises(UserError, match=re.escape(message)):
        validate_config(cfg)


def test_sensible_values_pass_validation(tmp_path):
    validate_config(compose_train(tmp_path, "model.latent_dim=2", "model.lr=3e-4", "eval.k=0"))


def test_a_new_key_that_nothing_reads_is_refused():
    with pytest.raises(UserError, match=r"\+foo=1: foo is not a setting of this project, so nothing would read it"):
        check_new_keys(["model.lr=1e-3", "+foo=1"])
    check_new_keys(["+trainer.limit_train_batches=10", "+callbacks.extra._target_=x.Y", "++seed=3"])


def test_a_config_hydra_cannot_compose_is_one_line_with_the_nearest_name(tmp_path):
    train, evaluate = "vae_lightning.train", "vae_lightning.eval"
    commands = {
        (train, "model.latentdim=3"): "model.latentdim is not a setting; did you mean model.latent_dim?",
        (train, "max_epochs=3"): "max_epochs is not a setting; did you mean trainer.max_epochs?",
        (train, "model=convv"): "model=convv is not a preset; did you mean model=conv? the presets of model: beta",
        (train, "-m", "seed=0,1", "model.lr"): "could not read an override (Error parsing override 'model.lr'",
        (evaluate, "ckpt_path=x", "kk=3"): "kk is not a setting; did you mean eval.k?",
        (train, "model.net=[1,2]"): "Error merging override model.net=[1,2]; Cannot merge DictConfig with ListConfig",
        (train, "+model.lr=0.01"): "model.lr is already a setting: write model.lr=0.01 (a leading + adds",
        (train, "seed=0,1"): "seed=0,1 gives several values: add -m to run one job for each, or write seed=[0,1]",
    }
    results = run_in_one_interpreter([["python", "-m", *words] for words in commands], cwd=tmp_path)
    assert len(results) == len(commands)
    for (code, _, err), expected in zip(results, commands.values(), strict=True):
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {expected}"), err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_every_config_group_ships_in_the_wheel_as_a_listed_package():
    """A config group left out of pyproject's packages still ships as data, with a setuptools
    warning on every build that it will stop doing so."""
    import tomllib

    listed = set(tomllib.loads((CONF_DIR.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(("vae_lightning", "conf", *d.relative_to(CONF_DIR).parts)) for d in CONF_DIR.rglob("*")
               if d.is_dir() and d.name != "__pycache__"}  # fmt: skip
    assert folders - listed == set()
