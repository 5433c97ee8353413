"""The BCE's cost: torch's ``binary_cross_entropy_with_logits`` summed over pixels against the
project's ``model.bce_from_logits``, forward and backward of one 128-image batch, and a whole bare
training step (elbo_terms, backward, fused Adam) with each; interleaved, medians.

    python benchmarks/bce_cost.py [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import vae_lightning.model as model_module
import vae_lightning.objectives as objectives
from vae_lightning.datasets import default_data_dir, ensure_dataset, load_split

PROJECT_BCE = objectives.bce_from_logits


def library_bce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype), reduction="none").sum(-1)


CANDIDATES = {"library": library_bce, "project": PROJECT_BCE}


def bce_ms(bce, logits: torch.Tensor, x: torch.Tensor) -> float:
    start = time.perf_counter()
    bce(logits, x).sum().backward()
    return (time.perf_counter() - start) * 1e3


def step_ms(bce, images: torch.Tensor, steps: int = 150) -> float:
    """Milliseconds per bare training step with ``bce`` as the model's BCE."""
    objectives.bce_from_logits = bce  # elbo_terms looks it up at call time
    try:
        torch.manual_seed(0)
        vae = model_module.VAE()
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, fused=True)
        order = torch.randperm(len(images))
        start = time.perf_counter()
        for i in range(0, 128 * steps, 128):
            bce_sum, kl = objectives.elbo_terms(vae, images[order[i : i + 128]])
            optimizer.zero_grad()
            (bce_sum.sum() + kl.sum()).backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps * 1e3
    finally:
        objectives.bce_from_logits = PROJECT_BCE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = default_data_dir()
    ensure_dataset(data_dir, download=True)
    images = load_split(data_dir, train=True)[0]
    x = images[:128]
    logits = (torch.randn(128, 784, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_()
    bce_times: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    step_times: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    for _ in range(500):
        for name, bce in CANDIDATES.items():
            bce_times[name].append(bce_ms(bce, logits, x))
    for _ in range(6):
        for name, bce in CANDIDATES.items():
            step_times[name].append(step_ms(bce, images))
    print(f"{args.threads} threads; milliseconds, medians (BCE of 500 batches, steps of 6 x 150):")
    for name in CANDIDATES:
        bce, step = statistics.median(bce_times[name]), statistics.median(step_times[name])
        print(f"  {name:8s} BCE forward + backward {bce:6.3f}   bare training step {step:7.2f}")


if __name__ == "__main__":
    main()
