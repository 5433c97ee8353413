"""p(x | z): the decoder's logits scored against the pixels. Bernoulli for now; the reconstruction
term every objective logs is its negative log-likelihood summed over pixels."""

from __future__ import annotations

import torch
from torch import Tensor


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
