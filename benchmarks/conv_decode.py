"""Latents decoded and scored per second by the conv net's decoder and the Bernoulli likelihood
(what the k = 5000 bound of a conv model is made of), on one chunk of the bound (32,768 latents):
its activations in PyTorch's default layout against channels-last, as ``ConvDecoder`` runs them,
each on the whole chunk at once, and channels-last in slices of ``bound.CPU_DECODE_ROWS`` rows, as
the bound's generic path runs it on a CPU; interleaved round by round so that all see the same
machine load. Prints the medians, their ratios, and the largest difference of their -log p(x|z).

Usage: ``python benchmarks/conv_decode.py [--rounds 7]``"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from epoch_speed import machine

from vae_lightning.bound import CPU_DECODE_ROWS
from vae_lightning.likelihoods import bce_from_logits
from vae_lightning.nets import ConvDecoder


def default_layout(decoder: ConvDecoder, z: torch.Tensor) -> torch.Tensor:
    """ConvDecoder.forward without the channels-last conversion."""
    h = torch.relu(decoder.fc(z)).view(-1, *decoder.grid)
    return decoder.deconv2(torch.relu(decoder.deconv1(h))).flatten(1)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    decoder = ConvDecoder(784, 20).eval()
    z = torch.randn(32768, 20)
    x = (torch.rand(32768, 784) < 0.3).float()
    candidates = {
        "default layout": lambda: bce_from_logits(default_layout(decoder, z), x),
        "channels-last": lambda: bce_from_logits(decoder(z), x),
        f"channels-last, {CPU_DECODE_ROWS} rows at a time": lambda: torch.cat(
            [
                bce_from_logits(decoder(rows), pixels)
                for rows, pixels in zip(z.split(CPU_DECODE_ROWS), x.split(CPU_DECODE_ROWS), strict=True)
            ]
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for run in candidates.values():
        run()  # warm-up
    for _ in range(args.rounds):
        for name, run in candidates.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    rate = {name: len(z) / statistics.median(ts) for name, ts in times.items()}
    nll = {name: run() for name, run in candidates.items()}
    print(json.dumps(machine(torch.device("cpu"))))
    for name, r in rate.items():
        diff = (nll[name] - nll["default layout"]).abs().max().item()
        ratio = r / rate["default layout"]
        print(f"{name}: {r:,.0f} latents/s (median of {args.rounds}), {ratio:.2f}x; -log p differs by {diff:.1e}")


if __name__ == "__main__":
    main()
