"""``python -m vae_lightning.eval ckpt_path=<checkpoint or run dir>``: the test ELBO, the
importance-weighted bound, active units and the figures, by the same ``trainer.test`` that ends
a training run."""

from __future__ import annotations

import inspect
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from vae_lightning.checkpoints import find_checkpoint, load_checkpoint
from vae_lightning.checks import validate_config
from vae_lightning.data import MNISTDataModule
from vae_lightning.errors import UserError
from vae_lightning.module import VAEModule
from vae_lightning.outputs import describe_disk_error, write_json
from vae_lightning.results import likelihood_note, report_lines
from vae_lightning.train import build


def load_trained(ckpt: Path) -> tuple[VAEModule, dict[str, Any]]:
    """The module in a vae_lightning checkpoint or the reference notebook's own ``state_dict``
    (same layer names), and the data protocol it was trained on, from one read of the file. A
    checkpoint without a protocol (the reference notebook's, or from before protocols existed)
    was trained on continuous MNIST."""
    state = load_checkpoint(ckpt)
    if "state_dict" in state:
        accepted = inspect.signature(VAEModule.__init__).parameters
        hparams = {k: v for k, v in state.get("hyper_parameters", {}).items() if k in accepted}
        weights = state["state_dict"]
    else:  # fc1: (hidden, input), fc_mu: (latent, hidden)
        weights = {f"model.{k}": v for k, v in state.items()}
        try:
            (hidden, inputs), latent = weights["model.fc1.weight"].shape, weights["model.fc_mu.weight"].shape[0]
        except (KeyError, AttributeError, ValueError):
            raise UserError(f"{ckpt} is neither a vae_lightning checkpoint nor a VAE state_dict") from None
        hparams = {"input_dim": inputs, "hidden_dim": hidden, "latent_dim": latent}
    module = VAEModule(**hparams)
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"the weights in {ckpt} do not fit the VAE: {str(err).splitlines()[1].strip()}") from None
    protocol = state.get(MNISTDataModule.__qualname__) if "state_dict" in state else None
    return module, protocol if isinstance(protocol, dict) else {"dataset": "mnist", "binarize": "none"}


def module_from_checkpoint(ckpt: Path) -> VAEModule:
    return load_trained(ckpt)[0]


def trained_data(protocol: dict[str, Any], data_cfg: DictConfig) -> DictConfig:
    """Today's data settings with the checkpoint's protocol (dataset, binarization) in place of
    today's: weights are evaluated on what they were trained on."""
    data_cfg = data_cfg.copy()
    for key in ("dataset", "binarize", "binarize_seed"):
        if key in protocol:
            data_cfg[key] = protocol[key]
    return data_cfg


def run(cfg: DictConfig) -> dict[str, Any]:
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise UserError("no checkpoint given; run python -m vae_lightning.eval ckpt_path=<file.ckpt or run dir>")
    if int(cfg.eval.k) < 1:
        raise UserError(f"eval.k={cfg.eval.k}: the number of importance samples must be at least 1")
    validate_config(cfg)
    ckpt = find_checkpoint(cfg.ckpt_path, "best")
    module, protocol = load_trained(ckpt)
    datamodule = build(trained_data(protocol, cfg.data), "data")
    datamodule.prepare_data()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    out = Path(cfg.paths.output_dir)
    trainer = L.Trainer(
        accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1,
        logger=TensorBoardLogger(out, name="tensorboard", version="", default_hp_metric=False),
        callbacks=[build(cfg.eval, "eval")], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    metrics = {k: float(v) for k, v in results.items()}
    metrics.update(k=cfg.eval.k, latent_dim=module.model.latent_dim, checkpoint=str(ckpt), **datamodule.protocol())
    metrics["note"] = likelihood_note(metrics)
    write_json(out / "metrics.json", metrics)
    trained_on = ", ".join(f"{key}={value}" for key, value in datamodule.protocol().items())
    header = f"\nEvaluation of {ckpt} in {out}, on the data it was trained on ({trained_on})"
    print("\n".join([header, *report_lines(metrics), f"  note: {metrics['note']}"]))
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)["test/iw_nll"]
    except SIGTERMException:
        print("error: stopped by SIGTERM before the evaluation finished; run the same command again", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
    except OSError as err:
        reason = describe_disk_error(err, cfg.paths.output_dir)
        if reason is None:
            raise
        print(f"error: {reason}", file=sys.stderr)
    raise SystemExit(1)


if __name__ == "__main__":
    main()
