"""``python -m vae_lightning.eval ckpt_path=<checkpoint or run dir>``: the test ELBO, the
importance-weighted bound, active units and the figures, by the same ``trainer.test`` that ends
a training run."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from vae_lightning.errors import UserError
from vae_lightning.outputs import describe_disk_error, write_json
from vae_lightning.plugin_configs import CONFIG_PATH
from vae_lightning.runs.building import build, load_trained, trained_data
from vae_lightning.runs.checks import validate_config
from vae_lightning.runs.results import likelihood_note, refuse, report_lines
from vae_lightning.training.checkpoints import find_checkpoint


def eval_device(device: str) -> torch.device:
    """``device=auto`` is a CUDA GPU if there is one, else the CPU; a device this machine lacks is one line."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"device={device} is not a device; use auto, cpu, cuda or cuda:<n>") from None
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"device={device} but this machine has no such CUDA GPU; use device=auto or device=cpu")
    if chosen.type not in ("cpu", "cuda"):
        raise UserError(f"device={device}: eval runs on cpu or cuda; use device=auto")
    return chosen


def run(cfg: DictConfig) -> dict[str, Any]:
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise UserError("no checkpoint given; run python -m vae_lightning.eval ckpt_path=<file.ckpt or run dir>")
    validate_config(cfg)
    device = eval_device(str(cfg.device))
    ckpt = find_checkpoint(cfg.ckpt_path, "best")
    module, protocol = load_trained(ckpt)
    datamodule = build(trained_data(protocol, cfg.data), "data")
    datamodule.prepare_data()
    out = Path(cfg.paths.output_dir)
    devices = [device.index or 0] if device.type == "cuda" else 1
    callbacks = [build(cfg.eval, "eval")] if cfg.eval.k > 0 else []
    trainer = build(cfg.trainer, "trainer", accelerator=device.type, devices=devices, callbacks=callbacks)
    results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    metrics = {k: float(v) for k, v in results.items()}
    metrics.update(k=cfg.eval.k, latent_dim=module.model.latent_dim, checkpoint=str(ckpt), **datamodule.protocol())
    if "test/iw_nll" in metrics:
        metrics["note"] = likelihood_note(metrics, module.model.likelihood.name)
    write_json(out / "metrics.json", metrics)
    trained_on = ", ".join(f"{key}={value}" for key, value in datamodule.protocol().items())
    header = f"\nEvaluation of {ckpt} in {out}, on the data it was trained on ({trained_on})"
    note = [f"  note: {metrics['note']}"] if "note" in metrics else []
    print("\n".join([header, *report_lines(metrics), *note]))
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> float:
    try:
        metrics = run(cfg)
        return metrics.get("test/iw_nll", metrics["test/loss"])
    except SIGTERMException:
        print(
            "error: stopped by SIGTERM before the evaluation finished; run the same command again "
            "(a bound with k >= 1000 continues where it stopped)",
            file=sys.stderr,
        )
        raise SystemExit(128 + signal.SIGTERM) from None
    except UserError as err:
        refuse(str(err), cfg.paths.output_dir)
    except OSError as err:
        reason = describe_disk_error(err, cfg.paths.output_dir)
        if reason is None:
            raise
        refuse(reason, cfg.paths.output_dir)


if __name__ == "__main__":
    main()
