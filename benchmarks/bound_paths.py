"""The k = 5000 bound of the reference MLP for each likelihood, by the path it takes (the fast
path through the decoder's last hidden layer, or the generic one), on the same test images and
draws, interleaved round by round so that all see the same machine load. Prints each one's median
time and the minutes it implies for the 10,000 test images, and how far the paths' bounds differ.
``--head-rows`` times the fast paths with each number of rows a CPU takes at a time
(``bound.CPU_HEAD_ROWS``; 32768 is a whole chunk).

Usage: ``python benchmarks/bound_paths.py [--images 100] [--rounds 3] [--head-rows 4096,32768]``
(100 images: one batch of the evaluation; untrained weights: the cost does not depend on them)"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from epoch_speed import interleaved, machine

import vae_lightning.model.bound as bound_module
from vae_lightning.data.datasets import default_data_dir, load_split
from vae_lightning.model.bound import iw_log_likelihood
from vae_lightning.model.vae import VAE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--head-rows", default=str(bound_module.CPU_HEAD_ROWS))
    args = parser.parse_args()
    head_rows = [int(rows) for rows in args.head_rows.split(",")]
    torch.manual_seed(0)
    x = load_split(default_data_dir(), train=False)[0][: args.images]
    binary = (x > 0.5).float()
    models = {name: VAE(likelihood=name).eval() for name in ("bernoulli", "continuous_bernoulli", "gaussian")}
    candidates = {}  # (model, pixels, the fast path's rows at a time, or None: the generic path)
    for likelihood in models:
        pixels = binary if likelihood == "bernoulli" else x
        for rows in head_rows:
            fast = "fast" if len(head_rows) == 1 else f"fast, {rows} rows"
            candidates[f"{likelihood}, {fast}"] = (models[likelihood], pixels, rows)
        if likelihood != "bernoulli":
            candidates[f"{likelihood}, generic"] = (models[likelihood], pixels, None)

    def bound(model: VAE, pixels: torch.Tensor, rows: int | None) -> torch.Tensor:
        if rows is None:
            model.linear_head = lambda: None  # what every net without a linear last layer does
        bound_module.CPU_HEAD_ROWS = rows or bound_module.CPU_HEAD_ROWS
        try:
            return iw_log_likelihood(model, pixels, 5000, generator=torch.Generator().manual_seed(1))
        finally:
            model.__dict__.pop("linear_head", None)

    results, times = interleaved(candidates, bound, args.rounds)
    print(json.dumps(machine(torch.device("cpu"))))
    for name, ts in times.items():
        median = statistics.median(ts)
        per_test_set = median * 10000 / args.images / 60
        print(f"{name}: {median:.2f} s for {args.images} images, about {per_test_set:.1f} min per test set")
    for name, (model, _, rows) in candidates.items():
        generic = results.get(f"{model.likelihood.name}, generic")
        if rows is not None and generic is not None:
            difference = (results[name] - generic).abs().max()
            print(f"{name} against the generic path: largest difference {difference:.1e} nats")


if __name__ == "__main__":
    main()
