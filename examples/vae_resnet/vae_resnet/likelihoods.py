"""A Laplace likelihood: p(x|z) = prod_j exp(-|x_j - m_j| / b_j) / (2 b_j), m = sigmoid(logits),
one learned scale b per pixel (log b kept in [-7, 1]): a density on the real line per pixel."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vae_lightning.model.likelihoods import Likelihood, at_least_fp32


class Laplace(Likelihood):
    density_support = "the real line per pixel"
    LOG_SCALE_RANGE = (-7.0, 1.0)

    def __init__(self, input_dim: int) -> None:
        super().__init__(input_dim)
        self.log_scale = nn.Parameter(torch.zeros(input_dim))

    def nll(self, logits: Tensor, x: Tensor) -> Tensor:
        mean = torch.sigmoid(at_least_fp32(logits))
        log_scale = self.log_scale.float().clamp(*self.LOG_SCALE_RANGE)
        return ((x.to(mean.dtype) - mean).abs() * torch.exp(-log_scale) + log_scale + math.log(2)).sum(-1)

    def mean(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)
