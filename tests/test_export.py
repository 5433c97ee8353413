"""Exported encoders and decoders compute what the model computes, without this package."""

import json

import numpy as np
import pytest
import torch
from helpers import run_cli

from vae_lightning.export import export
from vae_lightning.model.vae import VAE
from vae_lightning.runs.building import module_from_checkpoint
from vae_lightning.training.checkpoints import find_checkpoint


@pytest.fixture
def vae() -> VAE:
    torch.manual_seed(0)
    return VAE({"hidden": [64]}, latent_dim=5).eval()


def inputs(vae: VAE) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(7, vae.input_dim, generator=gen), torch.randn(7, vae.latent_dim, generator=gen)


def test_torchscript_and_safetensors_match_the_model(vae, tmp_path):
    from safetensors.torch import load_file

    x, z = inputs(vae)
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        digits = vae.decode(z)
        export(vae, tmp_path / "ts", "torchscript")
        torch.testing.assert_close(torch.jit.load(tmp_path / "ts" / "decoder.pt")(z), digits)
        torch.testing.assert_close(torch.jit.load(tmp_path / "ts" / "encoder.pt")(x), (mu, logvar))
    export(vae, tmp_path / "st", "safetensors")
    sizes = json.loads((tmp_path / "st" / "vae.json").read_text())
    fresh = VAE(**sizes)
    fresh.load_state_dict(
        {**load_file(tmp_path / "st" / "encoder.safetensors"), **load_file(tmp_path / "st" / "decoder.safetensors")}
    )
    with torch.no_grad():
        torch.testing.assert_close(fresh.decode(z), digits)
        torch.testing.assert_close(fresh.encode(x), (mu, logvar))


@pytest.mark.slow
def test_export_cli_on_a_run_and_the_readme_recipe(trained_run, tmp_path):
    import onnxruntime as ort

    run_dir, _ = trained_run
    result = run_cli("vae_lightning.export", f"ckpt_path={run_dir}", "format=onnx", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{tmp_path}/decoder.onnx" in result.stdout
    assert not result.stderr.strip() and "warn" not in result.stdout.lower()  # no warning a user cannot act on
    # the files compute what the checkpoint's model computes, in onnxruntime
    vae = module_from_checkpoint(find_checkpoint(run_dir, "best")).model.eval()
    x, z = inputs(vae)
    mu, logvar = ort.InferenceSession(tmp_path / "encoder.onnx").run(None, {"x": x.numpy()})
    decoded = ort.InferenceSession(tmp_path / "decoder.onnx").run(None, {"z": z.numpy()})[0]
    with torch.no_grad():
        expected = (*vae.encode(x), vae.decode(z))
    for got, want in zip((mu, logvar, decoded), expected, strict=True):
        assert got.shape == tuple(want.shape) and np.abs(got - want.numpy()).max() <= 1e-5
    # the README's five lines
    decoder = ort.InferenceSession(tmp_path / "decoder.onnx")
    z = np.random.default_rng(0).standard_normal((10, 20), dtype=np.float32)
    digits = decoder.run(None, {"z": z})[0].reshape(10, 28, 28)
    assert digits.shape == (10, 28, 28) and 0 <= digits.min() and digits.max() <= 1
    assert 0.05 < (digits > 0.5).mean() < 0.4  # strokes on a dark background
    bad = run_cli("vae_lightning.export", f"ckpt_path={run_dir}", "format=pickle", f"hydra.run.dir={tmp_path}/b")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == ["error: format=pickle is not one of onnx, torchscript, safetensors"]
