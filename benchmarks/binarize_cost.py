"""What ``data.binarize=dynamic`` adds to a training step: one bare training step on a 128-image
MNIST batch, and the same step after drawing the batch's binarization, interleaved step by step,
so that both see the same machine load. Prints the medians and their ratio.

Usage: ``python benchmarks/binarize_cost.py [--steps 600]`` (``make bench`` times whole epochs,
(b') beside (b); this isolates the draw when the machine is shared)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from epoch_speed import bare_loss

from vae_lightning.data.datamodule import binarize
from vae_lightning.data.datasets import default_data_dir, load_split
from vae_lightning.model.vae import VAE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    batches = load_split(default_data_dir(), train=True)[0][: 128 * 50].split(128)
    model = VAE()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3, fused=True)

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        bare_loss(model, x).backward()
        optimizer.step()

    plain, draw, dynamic = [], [], []
    for i in range(args.steps):
        x = batches[i % len(batches)]
        t0 = time.perf_counter()
        step(x)
        t1 = time.perf_counter()
        xb = binarize(x)
        t2 = time.perf_counter()
        step(xb)
        t3 = time.perf_counter()
        if i >= 50:  # warm-up steps left out
            plain.append(t1 - t0), draw.append(t2 - t1), dynamic.append(t3 - t1)
    m = statistics.median
    print(
        f"bare step {m(plain) * 1e3:.3f} ms, the draw {m(draw) * 1e3:.3f} ms ({m(draw) / m(plain):.1%} of a step), "
        f"draw + step {m(dynamic) * 1e3:.3f} ms; medians of {len(plain)}, {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
