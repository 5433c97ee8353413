"""Latents decoded and scored per second by the conv net's k = 5000 bound (the generic path of
``bound.iw_log_likelihood``, on 100 test-like images, one batch of the evaluation), with the
decoder's layers in PyTorch's default layout (NCHW, fresh ReLU outputs); channels-last through the
linear map, ReLUs in place, every layer torch's (``ConvDecoder`` before); and ``ConvDecoder`` as it
is (its last layer, one output channel, by ``nets.conv_transpose_by_fold``); each decoding
``bound.CPU_DECODE_ROWS`` rows at a time as the bound does on a CPU, and ``ConvDecoder`` also
whole chunks at once. Interleaved round by round so that all see the same machine load; the
medians, their ratios, and the largest difference of the bounds. Timed inside the bound rather
than on bare decodes because what the decoder allocates costs differently there (the bound holds
its chunk's draws).

``--checkpoint <a conv run's .ckpt>`` times its trained weights on the first 100 test images of the
data it was trained on (with ``VAE_DATA_DIR``), in place of untrained weights on random 0/1 images.

Usage: ``python benchmarks/conv_decode.py [--rounds 5] [--k 300] [--checkpoint <ckpt>]``"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from epoch_speed import interleaved, machine

import vae_lightning.model.bound as bound_module
import vae_lightning.model.nets as nets
from vae_lightning.data.datamodule import MNISTDataModule
from vae_lightning.model.bound import iw_log_likelihood
from vae_lightning.model.nets import ConvDecoder
from vae_lightning.model.vae import VAE
from vae_lightning.runs.building import load_trained


def default_layout(decoder: ConvDecoder, z: torch.Tensor) -> torch.Tensor:
    """ConvDecoder's layers in PyTorch's default layout, fresh ReLU outputs."""
    h = torch.relu(decoder.fc(z)).view(-1, *decoder.grid)
    return decoder.deconv2(torch.relu(decoder.deconv1(h))).flatten(1)


PROJECT_FORWARD = ConvDecoder.forward


def all_layers_torchs(decoder: ConvDecoder, z: torch.Tensor) -> torch.Tensor:
    """ConvDecoder.forward before: the same, with torch's own transposed convolution as the last layer."""
    fold, nets.conv_transpose_by_fold = nets.conv_transpose_by_fold, lambda h, layer: layer(h)
    try:
        return PROJECT_FORWARD(decoder, z)
    finally:
        nets.conv_transpose_by_fold = fold


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--k", type=int, default=300)
    parser.add_argument("--checkpoint", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.checkpoint:
        module, protocol = load_trained(args.checkpoint)
        model = module.model.eval()
        data = MNISTDataModule(**protocol)
        data.prepare_data()
        data.setup("test")
        x = data.test_x[:100].float()
    else:
        model = VAE({"name": "conv"}).eval()
        x = (torch.rand(100, 784) < 0.3).float()
    sliced = bound_module.CPU_DECODE_ROWS
    candidates = {
        f"default layout, {sliced} rows at a time": (default_layout, sliced),
        f"channels-last, every layer torch's, {sliced} rows at a time": (all_layers_torchs, sliced),
        f"ConvDecoder, {sliced} rows at a time": (PROJECT_FORWARD, sliced),
        "ConvDecoder, whole chunks": (PROJECT_FORWARD, 1 << 30),
    }

    def bound(form, rows: int) -> torch.Tensor:
        project_forward, ConvDecoder.forward, bound_module.CPU_DECODE_ROWS = ConvDecoder.forward, form, rows
        try:
            return iw_log_likelihood(model, x, args.k, generator=torch.Generator().manual_seed(1))
        finally:
            ConvDecoder.forward, bound_module.CPU_DECODE_ROWS = project_forward, sliced

    results, times = interleaved(candidates, bound, args.rounds)
    rate = {name: len(x) * args.k / statistics.median(ts) for name, ts in times.items()}
    first = next(iter(candidates))
    print(json.dumps(machine(torch.device("cpu"))))
    for name, r in rate.items():
        diff = (results[name] - results[first]).abs().max().item()
        ratio = r / rate[first]
        print(f"{name}: {r:,.0f} latents/s (median of {args.rounds}), {ratio:.2f}x; bounds differ by {diff:.1e}")


if __name__ == "__main__":
    main()
