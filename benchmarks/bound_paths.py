"""The k = 5000 bound of the reference MLP for each likelihood, by the path it takes (the fast
path through the decoder's last hidden layer, or the generic one), on the same test images and
draws, interleaved round by round so that all see the same machine load. Prints each one's median
time and the minutes it implies for the 10,000 test images, and how far the paths' bounds differ.

Usage: ``python benchmarks/bound_paths.py [--images 20] [--rounds 3]`` (untrained weights: the
cost does not depend on them)"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from epoch_speed import machine

from vae_lightning.bound import iw_log_likelihood
from vae_lightning.datasets import default_data_dir, load_split
from vae_lightning.model import VAE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = load_split(default_data_dir(), train=False)[0][: args.images]
    binary = (x > 0.5).float()
    models = {name: VAE(likelihood=name).eval() for name in ("bernoulli", "continuous_bernoulli", "gaussian")}
    candidates = {  # (model, pixels, fast path or not)
        "bernoulli, fast": (models["bernoulli"], binary, True),
        "continuous_bernoulli, fast": (models["continuous_bernoulli"], x, True),
        "continuous_bernoulli, generic": (models["continuous_bernoulli"], x, False),
        "gaussian, fast": (models["gaussian"], x, True),
        "gaussian, generic": (models["gaussian"], x, False),
    }

    def bound(model: VAE, pixels: torch.Tensor, fast: bool) -> torch.Tensor:
        if not fast:
            model.linear_head = lambda: None  # what every net without a linear last layer does
        try:
            return iw_log_likelihood(model, pixels, 5000, generator=torch.Generator().manual_seed(1))
        finally:
            model.__dict__.pop("linear_head", None)

    times: dict[str, list[float]] = {name: [] for name in candidates}
    results = {name: bound(*candidate) for name, candidate in candidates.items()}  # warm-up
    for _ in range(args.rounds):
        for name, candidate in candidates.items():
            t0 = time.perf_counter()
            bound(*candidate)
            times[name].append(time.perf_counter() - t0)
    print(json.dumps(machine(torch.device("cpu"))))
    for name, ts in times.items():
        median = statistics.median(ts)
        per_test_set = median * 10000 / args.images / 60
        print(f"{name}: {median:.2f} s for {args.images} images, about {per_test_set:.1f} min per test set")
    for likelihood in ("continuous_bernoulli", "gaussian"):
        diff = (results[f"{likelihood}, fast"] - results[f"{likelihood}, generic"]).abs().max()
        print(f"{likelihood}, fast against generic path: largest difference {diff:.1e} nats")


if __name__ == "__main__":
    main()
