"""What a likelihood's -log p(x | z) costs in training: the library's form against the project's,
forward and backward of one 128-image batch, and a whole bare training step (elbo_terms, backward,
fused Adam) with each; interleaved, medians, with the machine's CPU.

- Bernoulli: torch's ``binary_cross_entropy_with_logits`` summed over pixels, against
  ``likelihoods.bce_from_logits`` (one log per 8 pixels, no log1p).
- continuous Bernoulli: ``torch.distributions.ContinuousBernoulli.log_prob``; autograd through the
  formula BCE - log(l / tanh(l / 2)) (what the project ran before); the project's
  ``ContinuousBernoulli.nll`` (one function with its derivative written out).

    python benchmarks/likelihood_cost.py [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from epoch_speed import machine

from vae_lightning.data.datasets import default_data_dir, ensure_dataset, load_split
from vae_lightning.model.likelihoods import Bernoulli, ContinuousBernoulli, bce_from_logits
from vae_lightning.model.objectives import elbo_terms
from vae_lightning.model.vae import VAE


def library_bce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype), reduction="none").sum(-1)


def library_cb(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return -torch.distributions.ContinuousBernoulli(logits=logits, validate_args=False).log_prob(x).sum(-1)


def autograd_cb(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    small = logits.abs() < 1e-3
    safe = torch.where(small, torch.ones_like(logits), logits)
    log_c = torch.where(small, torch.log(2 + logits.pow(2) / 6), torch.log(safe / torch.tanh(safe / 2)))
    return bce_from_logits(logits, x) - log_c.sum(-1)


CANDIDATES = {  # name: (the model's likelihood, its -log p)
    "Bernoulli, library": ("bernoulli", library_bce),
    "Bernoulli, project": ("bernoulli", Bernoulli().nll),
    "continuous Bernoulli, library": ("continuous_bernoulli", library_cb),
    "continuous Bernoulli, autograd": ("continuous_bernoulli", autograd_cb),
    "continuous Bernoulli, project": ("continuous_bernoulli", ContinuousBernoulli().nll),
}


def nll_ms(nll, logits: torch.Tensor, x: torch.Tensor) -> float:
    start = time.perf_counter()
    nll(logits, x).sum().backward()
    return (time.perf_counter() - start) * 1e3


def step_ms(likelihood: str, nll, images: torch.Tensor, steps: int = 150) -> float:
    """Milliseconds per bare training step with ``nll`` as the model's -log p(x | z)."""
    torch.manual_seed(0)
    vae = VAE(likelihood=likelihood)
    vae.likelihood.nll = nll  # the model calls self.likelihood.nll
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, fused=True)
    order = torch.randperm(len(images))
    start = time.perf_counter()
    for i in range(0, 128 * steps, 128):
        rec, kl = elbo_terms(vae, images[order[i : i + 128]])
        optimizer.zero_grad()
        (rec.sum() + kl.sum()).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = default_data_dir()
    ensure_dataset(data_dir, download=True)
    images = load_split(data_dir, train=True)[0]  # grey levels in [0, 1]
    x = images[:128]
    logits = (torch.randn(128, 784, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_()
    nll_times: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    step_times: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    for _ in range(500):
        for name, (_, nll) in CANDIDATES.items():
            nll_times[name].append(nll_ms(nll, logits, x))
    for _ in range(6):
        for name, (likelihood, nll) in CANDIDATES.items():
            step_times[name].append(step_ms(likelihood, nll, images))
    print(machine(torch.device("cpu")))
    print("milliseconds, medians (-log p of 500 batches of 128 x 784, steps of 6 x 150):")
    for name in CANDIDATES:
        nll, step = statistics.median(nll_times[name]), statistics.median(step_times[name])
        print(f"  {name:32s} -log p forward + backward {nll:6.3f}   bare training step {step:6.2f}")


if __name__ == "__main__":
    main()
