"""p(x | z): the decoder's logits scored against the pixels (``model.likelihood``): Bernoulli (the
reference notebook's), continuous Bernoulli, Gaussian. The reconstruction term every objective
logs, ``rec``, is the chosen likelihood's -log p(x | z), summed over pixels (for the Bernoulli, the BCE).

Each is a ``Likelihood`` in the ``LIKELIHOODS`` registry (installed plugins add theirs), built as
``cls(input_dim)``, and carries what its consumers need: ``nll`` and ``mean``, how the report's
page draws its mean (``page_mean``), what its bound is a bound of (``density_support``), and
whether its figures show the decoder's lambda beside the mean (``lambda_differs_from_mean``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vae_lightning.registry import Registry


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
    place) and a spare buffer of the same shape. C(l) = |l| / tanh(|l| / 2) is
    even in l and >= 2, so sigmoid(|l|) C(l) >= 1 and a product of 4 overflows only past |l| ~ 1e9;
    C takes |l| raised to 1e-6, where it is 2 to within 2e-13, instead of the 0 / 0 at l = 0. One
    log per 4 logits, as ``sum_log_sigmoid_``."""
    half = spare.copy_(magnitudes).clamp_min_(1e-6).mul_(0.5)  # (not out=: vmap has no rule for it)
    product = magnitudes.sigmoid_().mul_(half).mul_(2).div_(half.tanh_())  # sigmoid(|l|) |l| / tanh(|l| / 2)
    group = next(g for g in (4, 2, 1) if magnitudes.shape[-1] % g == 0)
    return product.unflatten(-1, (-1, group)).prod(-1).log_().sum(-1)


class _PixelSummedNLL(torch.autograd.Function):
    """-log p(x | z) summed over the last dimension, with its gradient written out, for a Bernoulli
    (the BCE) or, with ``continuous``, a continuous Bernoulli:
    sum_j softplus(l_j) - x_j l_j [- log C(l_j)], as sum_j relu(l_j) - x_j l_j minus the per-logit
    part the bound uses too (``sum_log_sigmoid_`` says why; ``sum_log_sigmoid_and_cb_normalizer_``).
    C(l) = l / tanh(l / 2) is the continuous Bernoulli's normaliser (Loaiza-Ganem & Cunningham 2019,
    eq. 7, in terms of the logit: 2 atanh(1 - 2 lambda) / (1 - 2 lambda), lambda = sigmoid(l)).
    The gradient is sigmoid(l) - x [- (log C)'(l)] per pixel.

    The BCE's gradient is the library's. On torch 2.14 the library's
    binary_cross_entropy_with_logits is as fast in a training step (benchmarks/likelihood_cost.py);
    this form stays because every documented number was trained with it (the two agree to 2e-5, not
    to the bit: docs/performance.md). The continuous Bernoulli's is written out because autograd
    through l / tanh(l / 2) loses it near l = 0 (off by up to 1e-4 in fp32, against 3e-7 here:
    tests/test_likelihoods_priors.py), and takes 1.4x the time (benchmarks/likelihood_cost.py).
    torch.distributions.ContinuousBernoulli is no answer: it clamps lambda to [eps, 1 - eps], so in
    fp32 its -log p is off by 0.06 nats a pixel at |l| = 17 and 0.6 at |l| = 30, and trained models
    put most logits there (on 1,000 test images, |l| > 17 for 87% on MNIST and 49% on
    Fashion-MNIST, the rows' seed-0 weights); it also takes 3.6x the time."""

    @staticmethod
    def forward(logits: Tensor, x: Tensor, continuous: bool) -> Tensor:
        magnitude = logits.abs()
        linear = 0.5 * (logits.sum(-1) + magnitude.sum(-1)) - (x * logits).sum(-1)  # relu(l) = (l + |l|) / 2
        if continuous:
            return linear - sum_log_sigmoid_and_cb_normalizer_(magnitude, torch.empty_like(magnitude))
        return linear - sum_log_sigmoid_(magnitude)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor, bool], output: Tensor) -> None:
        logits, x, ctx.continuous = inputs
        ctx.save_for_backward(logits, x)

    @staticmethod
    def vmap(info, in_dims: tuple, logits: Tensor, x: Tensor, continuous: bool) -> tuple[Tensor, int]:
        # seeds trained as one model run it under torch.func.vmap (training.replicas): it reduces
        # over the last dimension only, so the batched tensors go through as they are (torch's
        # generated rule would trace it again in Python at every call, ~1 ms a step)
        logits, x = (t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
                     for t, d in zip((logits, x), in_dims[:2], strict=True))  # fmt: skip
        return _PixelSummedNLL.apply(logits, x, continuous), 0

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, x = ctx.saved_tensors
        per_logit = torch.sigmoid(logits) - x
        if ctx.continuous:
            per_logit = per_logit - _log_cb_normalizer_derivative(logits)
        return per_logit * grad.unsqueeze(-1), None, None


def pixel_summed_nll(logits: Tensor, x: Tensor, continuous: bool = False) -> Tensor:
    """``_PixelSummedNLL`` per image, at least in fp32; ``x`` broadcasts against ``logits`` (k
    draws of z per image)."""
    logits = at_least_fp32(logits)
    return _PixelSummedNLL.apply(logits, x.to(logits.dtype).expand_as(logits), continuous)


def bce_from_logits(logits: Tensor, x: Tensor) -> Tensor:
    """Per-image BCE of sigmoid(logits) against x, summed over pixels: -log p(x | z) of a Bernoulli
    decoder; at least fp32 and stable for any logit. ``.sum()`` of it is the reference notebook's
    ``binary_cross_entropy(..., "sum")``. ``x`` broadcasts against ``logits`` (k draws of z per image)."""
    return pixel_summed_nll(logits, x)


def _log_cb_normalizer_derivative(logits: Tensor) -> Tensor:
    """d/dl log C(l) = 1/l - 1/sinh(l), odd in l. The difference cancels near 0, where its series
    a/6 - 7a^3/360 + 31a^5/15120 - 127a^7/604800 (a = |l|) is used: below a = 0.5 in fp32 (0.05 in
    fp64), where the series' error is below the difference's rounding. The two are joined by
    clamping a to each side of the seam, not by ``torch.where``, and 1/sinh(a) is taken as
    2e / (1 - e^2) with e = exp(-a): on a CPU torch's where and sinh are not vectorised and cost 20
    and 60 of the other passes here (a 128 x 784 batch)."""
    seam = 0.05 if logits.dtype == torch.float64 else 0.5

    def series(a):
        s = a * a
        return a * (1 / 6 - s * (7 / 360 - s * (31 / 15120 - s * (127 / 604800))))

    a = logits.abs()
    below = series(torch.clamp_max(a, seam)) - series(seam)  # 0 above the seam
    above = a.clamp_min_(seam)
    e = torch.exp(-above)
    exact = above.reciprocal_() - 2 * e / (1 - e * e)  # the whole value above the seam, its value at it below
    return torch.copysign(below.add_(exact), logits)


class Likelihood(nn.Module):
    """p(x | z) from the decoder's logits (one per pixel). Its ``name`` is the one it is registered
    under (the registry sets it); a subclass defines ``nll`` (-log p(x | z) per image, summed over
    pixels, at least fp32; ``x`` broadcasts against ``logits``) and ``mean`` (E[x | z], what samples
    and reconstructions show)."""

    name: str = ""
    # how the report's in-page decoder turns logits into the mean: "sigmoid" or
    # "continuous_bernoulli" (explorer.html knows these); None: the page says it cannot draw it
    page_mean: str | None = "sigmoid"
    # None: a probability of 0/1 pixels (the bound is an NLL of binarized images); else the set on
    # which it is a density of each pixel, for what the bound's note says
    density_support: str | None = None
    # the figures show the decoder's lambda (sigmoid of the logits) beside the mean
    lambda_differs_from_mean: bool = False

    def __init__(self, input_dim: int | None = None) -> None:  # pixels per image, for parameters per pixel
        super().__init__()

    def nll(self, logits: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, logits: Tensor) -> Tensor:
        raise NotImplementedError


LIKELIHOODS: Registry[type[Likelihood]] = Registry("likelihood", "model.likelihood")


@LIKELIHOODS.register("bernoulli")
class Bernoulli(Likelihood):
    """p(x|z) = prod_j lambda_j^x_j (1 - lambda_j)^(1 - x_j), lambda = sigmoid(logits): the reference
    notebook's. A probability for 0/1 pixels; on continuous pixels, not normalised."""

    def nll(self, logits: Tensor, x: Tensor) -> Tensor:
        return bce_from_logits(logits, x)

    def mean(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


@LIKELIHOODS.register("continuous_bernoulli")
class ContinuousBernoulli(Likelihood):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): the Bernoulli's form normalised
    on [0, 1], so a true density for continuous pixels. -log p = BCE - log C(lambda) per pixel. Its
    mean is not lambda (the paper's point: images drawn with lambda look sharper than the mean)."""

    page_mean = "continuous_bernoulli"
    density_support, lambda_differs_from_mean = "[0, 1] per pixel", True

    def nll(self, logits: Tensor, x: Tensor) -> Tensor:
        return pixel_summed_nll(logits, x, continuous=True)

    def mean(self, logits: Tensor) -> Tensor:
        """E[x] = lambda / (2 lambda - 1) + 1 / (2 atanh(1 - 2 lambda)) = sigmoid(l) / tanh(l / 2) - 1 / l;
        1/2 + l / 12 near l = 0."""
        small = logits.abs() < 1e-3
        safe = torch.where(small, torch.ones_like(logits), logits)
        exact = torch.sigmoid(safe) / torch.tanh(safe / 2) - 1 / safe
        return torch.where(small, 0.5 + logits / 12, exact)


@LIKELIHOODS.register("gaussian")
class Gaussian(Likelihood):
    """p(x|z) = N(x; sigmoid(logits), diag(sigma^2)) with one learned variance per pixel, log sigma^2
    kept in [-9, 2] (sigma from 0.011 to 2.7): a density on continuous pixels, which on 8-bit images
    can exceed 1, so -log p can be negative (docs/protocols.md)."""

    density_support = "the real line per pixel"
    LOG_VAR_RANGE = (-9.0, 2.0)

    def __init__(self, input_dim: int) -> None:
        super().__init__(input_dim)
        self.log_var = nn.Parameter(torch.zeros(input_dim))

    def nll(self, logits: Tensor, x: Tensor) -> Tensor:
        mean = torch.sigmoid(at_least_fp32(logits))
        log_var = self.log_var.float().clamp(*self.LOG_VAR_RANGE)
        per_pixel = (x.to(mean.dtype) - mean).pow(2) * torch.exp(-log_var) + log_var + math.log(2 * math.pi)
        return 0.5 * per_pixel.sum(-1)

    def mean(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


def build_likelihood(name: str, input_dim: int) -> Likelihood:
    return LIKELIHOODS.get(name)(input_dim)
