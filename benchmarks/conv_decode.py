"""Decodes per second of the conv net's decoder (what the k = 5000 bound of a conv model is made
of): its activations in PyTorch's default layout against channels-last, as ``ConvDecoder`` runs
them, on one chunk of the bound (32,768 latents), interleaved round by round so that both see the
same machine load. Prints the medians, their ratio, and the largest difference of their logits.

Usage: ``python benchmarks/conv_decode.py [--rounds 7]``"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from epoch_speed import machine

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
    candidates = {"default layout": lambda: default_layout(decoder, z), "channels-last": lambda: decoder(z)}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for run in candidates.values():
        run()  # warm-up
    for _ in range(args.rounds):
        for name, run in candidates.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    rate = {name: len(z) / statistics.median(ts) for name, ts in times.items()}
    diff = (candidates["channels-last"]() - candidates["default layout"]()).abs().max().item()
    print(json.dumps(machine(torch.device("cpu"))))
    for name, r in rate.items():
        print(f"{name}: {r:,.0f} decodes/s (median of {args.rounds})")
    ratio = rate["channels-last"] / rate["default layout"]
    print(f"channels-last / default: {ratio:.2f}x; largest logit difference {diff:.1e}")


if __name__ == "__main__":
    main()
