"""``python -m vae_lightning.export ckpt_path=<run or file> format=onnx|torchscript|safetensors``:
the encoder and the decoder of a checkpoint as files that need neither this package nor Lightning."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from vae_lightning.errors import UserError
from vae_lightning.model.vae import VAE
from vae_lightning.plugin_configs import CONFIG_PATH
from vae_lightning.runs.building import module_from_checkpoint
from vae_lightning.runs.results import refuse
from vae_lightning.training.checkpoints import find_checkpoint
from vae_lightning.workarounds import quiet_onnx_exporter

FORMATS = ("onnx", "torchscript", "safetensors")


class Encoder(nn.Module):
    """x (n, input_dim) in [0, 1] -> (mu, logvar) of q(z|x), each (n, latent_dim): the VAE's encoder alone."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.net = vae.encoder

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(x)


class Decoder(nn.Module):
    """z (n, latent_dim) -> pixel probabilities (n, input_dim): the VAE's decoder alone, with the
    likelihood's mean."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.net, self.likelihood = vae.decoder, vae.likelihood

    def forward(self, z: Tensor) -> Tensor:
        return self.likelihood.mean(self.net(z))


def export(vae: VAE, out: Path, fmt: str) -> list[Path]:
    """Write ``encoder.<ext>`` and ``decoder.<ext>`` (and ``vae.json``: the VAE's settings) into ``out``."""
    vae = vae.float().cpu().eval()
    out.mkdir(parents=True, exist_ok=True)
    settings = vae.settings  # the net by name and its sizes: enough to build the VAE again
    (out / "vae.json").write_text(json.dumps(settings, indent=2) + "\n")
    parts = {
        "encoder": (Encoder(vae).eval(), torch.rand(2, vae.input_dim), ["x"], ["mu", "logvar"]),
        "decoder": (Decoder(vae).eval(), torch.randn(2, vae.latent_dim), ["z"], ["x"]),
    }
    written = []
    for name, (module, example, inputs, outputs) in parts.items():
        if fmt == "onnx":
            path = out / f"{name}.onnx"
            batch = ({0: torch.export.Dim("n")},)  # any number of images or codes
            with quiet_onnx_exporter():
                torch.onnx.export(
                    module, (example,), path, input_names=inputs, output_names=outputs, dynamic_shapes=batch,
                    dynamo=True, external_data=False, verbose=False,
                )  # fmt: skip
        elif fmt == "torchscript":
            path = out / f"{name}.pt"
            with warnings.catch_warnings():  # torch deprecates TorchScript; it is the format asked for
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.trace(module, example).save(str(path))
        else:
            from safetensors.torch import save_file

            path = out / f"{name}.safetensors"
            # the layers' names as in the VAE's own state_dict: the files load into VAE(**vae.json)
            weights = {k: v.contiguous() for k, v in module.net.state_dict().items()}
            if name == "decoder":  # a learned variance (gaussian) goes with the decoder
                weights.update({f"likelihood.{k}": v.contiguous() for k, v in vae.likelihood.state_dict().items()})
            save_file(weights, str(path), metadata={"vae": json.dumps(settings)})
        written.append(path)
    if fmt == "safetensors" and vae.prior.state_dict():  # a learned prior: what sample_z draws from
        from safetensors.torch import save_file

        save_file(
            {f"prior.{k}": v.contiguous() for k, v in vae.prior.state_dict().items()}, str(out / "prior.safetensors")
        )
        written.append(out / "prior.safetensors")
    return written


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
            raise UserError("no checkpoint given; run python -m vae_lightning.export ckpt_path=<file.ckpt or run dir>")
        if cfg.format not in FORMATS:
            raise UserError(f"format={cfg.format} is not one of {', '.join(FORMATS)}")
        ckpt = find_checkpoint(cfg.ckpt_path, "best")
        paths = export(module_from_checkpoint(ckpt).model, Path(cfg.paths.output_dir), cfg.format)
    except ModuleNotFoundError as err:  # the exporters are an optional extra
        refuse(f"format={cfg.format} needs {err.name}: pip install 'vae_lightning[export]'", cfg.paths.output_dir)
    except UserError as err:
        refuse(str(err), cfg.paths.output_dir)
    print(f"Exported {ckpt} as {cfg.format}:", *(f"  {p}" for p in paths), sep="\n")


if __name__ == "__main__":
    main()
