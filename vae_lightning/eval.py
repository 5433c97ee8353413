"""``python -m vae_lightning.eval ckpt_path=<checkpoint or run dir>``: the test ELBO, the
importance-weighted bound, active units and the figures, by the same ``trainer.test`` that ends
a training run."""

from __future__ import annotations

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

from vae_lightning.building import build, load_trained, trained_data
from vae_lightning.checkpoints import find_checkpoint
from vae_lightning.checks import validate_config
from vae_lightning.errors import UserError
from vae_lightning.outputs import describe_disk_error, write_json
from vae_lightning.results import likelihood_note, report_lines


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
