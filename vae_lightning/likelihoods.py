"""p(x | z): the decoder's logits scored against the pixels (``model.likelihood``): Bernoulli (the
reference notebook's), continuous Bernoulli, Gaussian. The reconstruction term every objective
logs, ``rec``, is the chosen likelihood's -log p(x | z), summed over pixels (for the Bernoulli, the BCE)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def at_least_fp32(t: Tensor) -> Tensor:
    # under autocast the layers run in fp16/bf16; the sums over 784 pixels must not
    return t.to(torch.promote_types(t.dtype, torch.float32))


def sum_log_sigmoid_(magnitudes: Tensor) -> Tensor:
    """sum over the last dimension of log sigmoid(|l|), given |l| (overwritten in place).

    softplus(l) = relu(l) - log sigmoid(|l|), and the BCE and the bound need its sum over pixels.
    torch's softplus, log1p and binary_cross_entropy_with_logits take a log1p per pixel, which
    torch does not vectorise on CPUs: the costliest elementwise op of a training step, and as slow
    as the GEMM that makes the logits in the bound (docs/performance.md). Here: one sigmoid per
    pixel and one log per group of up to 8; each sigmoid(|l|) lies in [1/2, 1], so a product of 8
    cannot underflow, and its log loses nothing that matters.
    """
    group = next(g for g in (8, 4, 2, 1) if magnitudes.shape[-1] % g == 0)
    return magnitudes.sigmoid_().unflatten(-1, (-1, group)).prod(-1).log_().sum(-1)


def sum_log_sigmoid_and_cb_normalizer_(magnitudes: Tensor, spare: Tensor) -> Tensor:
    """sum over the last dimension of log sigmoid(|l|) + log C(l), the per-logit part of a continuous
    Bernoulli's log p(x | z) (its Bernoulli part's and its normaliser's), given |l| (overwritten in
    place) and a spare buffer of the same shape. C(l) = |l| / tanh(|l| / 2) is even in l and >= 2,
    so sigmoid(|l|) C(l) >= 1 and a product of 4 overflows only past |l| ~ 1e9; |l| is raised to 1e-6,
    where C is 2 in fp32, instead of the 0 / 0 at l = 0. One log per 4 logits, as ``sum_log_sigmoid_``."""
    magnitudes.clamp_min_(1e-6)
    ratio = torch.div(magnitudes, torch.tanh(torch.mul(magnitudes, 0.5, out=spare), out=spare), out=spare)
    group = next(g for g in (4, 2, 1) if magnitudes.shape[-1] % g == 0)
    return magnitudes.sigmoid_().mul_(ratio).unflatten(-1, (-1, group)).prod(-1).log_().sum(-1)


class _PixelSummedBCE(torch.autograd.Function):
    """sum_j softplus(l_j) - x_j l_j over the last dimension, as
    sum_j relu(l_j) - x_j l_j - log sigmoid(|l_j|) (``sum_log_sigmoid_`` says why).
    The gradient is the library's: (sigmoid(l) - x) per pixel.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(logits, x)
        magnitude = logits.abs()
        linear = 0.5 * (logits.sum(-1) + magnitude.sum(-1)) - (x * logits).sum(-1)  # relu(l) = (l + |l|) / 2
        return linear - sum_log_sigmoid_(magnitude)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, x = ctx.saved_tensors
        return (torch.sigmoid(logits) - x) * grad.unsqueeze(-1), None


def bce_from_logits(logits: Tensor, x: Tensor) -> Tensor:
    """Per-image BCE of sigmoid(logits) against x, summed over pixels: -log p(x | z) of a Bernoulli
    decoder; at least fp32 and stable for any logit. ``.sum()`` of it is the reference notebook's
    ``binary_cross_entropy(..., "sum")``. ``x`` broadcasts against ``logits`` (k draws of z per image)."""
    logits = at_least_fp32(logits)
    return _PixelSummedBCE.apply(logits, x.to(logits.dtype).expand_as(logits))


def _log_cb_normalizer(logits: Tensor) -> Tensor:
    """log C(lambda) of the continuous Bernoulli with lambda = sigmoid(l) (Loaiza-Ganem & Cunningham
    2019, eq. 7): C = 2 atanh(1 - 2 lambda) / (1 - 2 lambda), which is l / tanh(l / 2) in terms of
    the logit; 2 + l^2 / 6 near l = 0, where the quotient is 0 / 0."""
    small = logits.abs() < 1e-3
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = torch.log(safe / torch.tanh(safe / 2))
    return torch.where(small, torch.log(2 + logits.pow(2) / 6), exact)


class Bernoulli(nn.Module):
    """p(x|z) = prod_j lambda_j^x_j (1 - lambda_j)^(1 - x_j), lambda = sigmoid(logits): the reference
    notebook's. A probability for 0/1 pixels; on continuous pixels, not normalised."""

    name = "bernoulli"

    def nll(self, logits: Tensor, x: Tensor) -> Tensor:
        return bce_from_logits(logits, x)

    def mean(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


class ContinuousBernoulli(nn.Module):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): the Bernoulli's form normalised
    on [0, 1], so a true density for continuous pixels. -log p = BCE - log C(lambda) per pixel. Its
    mean is not lambda (the paper's point: images drawn with lambda look sharper than the mean)."""

    name = "continuous_bernoulli"

    def nll(self, logits: Tensor, x: Tensor) -> Tensor:
        logits = at_least_fp32(logits)
        return bce_from_logits(logits, x) - _log_cb_normalizer(logits).sum(-1)

    def mean(self, logits: Tensor) -> Tensor:
        """E[x] = lambda / (2 lambda - 1) + 1 / (2 atanh(1 - 2 lambda)) = sigmoid(l) / tanh(l / 2) - 1 / l;
        1/2 + l / 12 near l = 0."""
        small = logits.abs() < 1e-3
        safe = torch.where(small, torch.ones_like(logits), logits)
        exact = torch.sigmoid(safe) / torch.tanh(safe / 2) - 1 / safe
        return torch.where(small, 0.5 + logits / 12, exact)


class Gaussian(nn.Module):
    """p(x|z) = N(x; sigmoid(logits), diag(sigma^2)) with one learned variance per pixel, log sigma^2
    kept in [-9, 2] (sigma from 0.011 to 2.7): a density on continuous pixels, which on 8-bit images
    can exceed 1, so -log p can be negative (docs/protocols.md)."""

    name = "gaussian"
    LOG_VAR_RANGE = (-9.0, 2.0)

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(input_dim))

    def nll(self, logits: Tensor, x: Tensor) -> Tensor:
        mean = torch.sigmoid(at_least_fp32(logits))
        log_var = self.log_var.float().clamp(*self.LOG_VAR_RANGE)
        per_pixel = (x.to(mean.dtype) - mean).pow(2) * torch.exp(-log_var) + log_var + math.log(2 * math.pi)
        return 0.5 * per_pixel.sum(-1)

    def mean(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


LIKELIHOODS = {cls.name: cls for cls in (Bernoulli, ContinuousBernoulli, Gaussian)}


def build_likelihood(name: str, input_dim: int) -> nn.Module:
    if name not in LIKELIHOODS:
        raise ValueError(f"model.likelihood={name!r} is not one of {', '.join(LIKELIHOODS)}")
    return Gaussian(input_dim) if name == "gaussian" else LIKELIHOODS[name]()
