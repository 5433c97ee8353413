"""Every config composes and every object in it can be built."""

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from vae_lightning.errors import UserError
from vae_lightning.train import build, check_hardware, validate_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_train(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])
    OmegaConf.resolve(cfg)
    return cfg


def test_defaults_are_the_seed_run(tmp_path):
    cfg = compose_train(tmp_path)
    assert cfg.model.hidden_dim == 400 and cfg.model.latent_dim == 20 and cfg.model.lr == 1e-3
    assert cfg.data.batch_size == 128 and cfg.trainer.max_epochs == 100
    assert cfg.trainer.accelerator == "auto" and cfg.trainer.log_every_n_steps == 1
    assert cfg.model.init == "default" and cfg.seed == 0
    seed_cfg = compose_train(tmp_path, "experiment=seed")
    for key in ("model", "data", "trainer", "seed"):
        assert OmegaConf.select(seed_cfg, key) == OmegaConf.select(cfg, key), key


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
    ],
)
def test_impossible_values_are_refused_before_anything_is_built(tmp_path, override, message):
    cfg = compose_train(tmp_path, override, "data.data_dir=/nonexistent")  # data is never touched
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("+", r"\+")):
        validate_config(cfg)


def test_sensible_values_pass_validation(tmp_path):
    validate_config(compose_train(tmp_path, "model.latent_dim=2", "model.lr=3e-4", "eval.k=0"))
