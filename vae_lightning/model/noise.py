"""Where the model's Gaussian draws come from: a torch.Generator, the device's global generator
(None), or a source of draws of its own, such as each replica's generator when seeds train as one
batched model (``training.replicas``)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class NoiseSource(Protocol):
    """Anything that draws eps ~ N(0, I) of a given shape (a ``noise``/``generator`` argument)."""

    def standard_normal(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor: ...


Noise = torch.Generator | NoiseSource | None


def standard_normal(shape: tuple[int, ...], noise: Noise, device: torch.device, dtype: torch.dtype) -> Tensor:
    """eps ~ N(0, I) of ``shape`` from ``noise``: a generator, a ``NoiseSource``, or (None) the
    device's global generator."""
    if noise is None or isinstance(noise, torch.Generator):
        return torch.randn(shape, generator=noise, device=device, dtype=dtype)
    return noise.standard_normal(tuple(shape), device, dtype)
