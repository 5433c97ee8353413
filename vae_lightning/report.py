"""``python -m vae_lightning.report ckpt_path=<run dir or file>``: (re)build a run's ``report.html``,
which every training run also writes when it ends."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from vae_lightning.errors import UserError
from vae_lightning.figures.explorer import write_report
from vae_lightning.plugin_configs import CONFIG_PATH
from vae_lightning.runs.building import build, load_trained, trained_data
from vae_lightning.runs.results import refuse
from vae_lightning.training.checkpoints import find_checkpoint


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="report")
def main(cfg: DictConfig) -> None:
    try:
        if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
            raise UserError("no checkpoint given; run python -m vae_lightning.report ckpt_path=<run dir or file.ckpt>")
        ckpt = find_checkpoint(cfg.ckpt_path, "best")
        # a run's report goes in its dir; a loose checkpoint's in this command's own
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else Path(cfg.paths.output_dir)
        module, protocol = load_trained(ckpt)
        datamodule = build(trained_data(protocol, cfg.data), "data")
        datamodule.prepare_data()
        datamodule.setup("test")
        path = write_report(run_dir, module.model.eval(), datamodule)
    except UserError as err:
        refuse(str(err), cfg.paths.output_dir)
    print(f"Report of {ckpt}: {path}")


if __name__ == "__main__":
    main()
