"""The test-time numbers of trained weights: the importance-weighted bound on log p(x) and the
active units, from the VAE's methods only."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vae_lightning.model.likelihoods import (
    ContinuousBernoulli,
    Gaussian,
    sum_log_sigmoid_,
    sum_log_sigmoid_and_cb_normalizer_,
)
from vae_lightning.model.nets import IN_PLACE_ACTIVATIONS
from vae_lightning.model.vae import VAE


def active_units(mu: Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean E[z|x] varies across the data by more than
    ``threshold`` (Burda et al. 2015); ``mu`` is (images, latent_dim)."""
    return int((mu.double().var(dim=0) > threshold).sum())


@torch.no_grad()
def iw_log_likelihood(
    model: VAE, x: Tensor, k: int, chunk_rows: int = 32768, generator: torch.Generator | None = None
) -> Tensor:
    """Per-image importance-weighted bound log (1/k sum_i p(x, z_i) / q(z_i | x)), z_i ~ q(z | x),
    in float64 (Burda et al. 2015). k = 1 is the ELBO in expectation; it tightens as k grows.

    Memory stays bounded whatever k: samples are drawn ``chunk_rows // len(x)`` at a time and
    folded into a running log-sum-exp. The decoder's sums run in fp32 whatever the weights' dtype.
    A decoder whose logits are linear in a last hidden layer (every MLP) takes the fast path
    (``_log_px_linear_head``, or ``_log_px_gaussian_head`` for a Gaussian); any other net the
    generic one. All draw the same z.
    """
    mu, logvar = (t.float() for t in model.encode(x.to(model.dtype)))
    std = torch.exp(0.5 * logvar)
    n, d = mu.shape
    x = x.float()
    head = model.linear_head()
    if head is None:
        log_px = _log_px_generic(model, x)
    elif isinstance(model.likelihood, Gaussian):
        log_px = _log_px_gaussian_head(model, x, head)
    else:
        log_px = _log_px_linear_head(model, x, head)
    if head is not None and x.device.type == "cpu":
        log_px = _in_draw_slices(log_px, max(1, CPU_HEAD_ROWS // n))
    log_norm = 0.5 * d * math.log(2 * math.pi)
    log_q_const = -0.5 * logvar.sum(-1) - log_norm  # log q(z|x) = this - |eps|^2 / 2
    running = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)
    per_chunk = max(1, chunk_rows // n)
    for start in range(0, k, per_chunk):
        kc = min(per_chunk, k - start)
        eps = torch.randn(kc, n, d, device=x.device, generator=generator)
        z = mu + std * eps
        log_pz = model.log_prior(z)
        log_qz = log_q_const - 0.5 * eps.pow(2).sum(-1)
        log_w = (log_px(z) + log_pz - log_qz).double()  # (kc, n)
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
    return running - math.log(k)


# On a CPU the generic path decodes this many rows at a time: the conv net's 32 x 14 x 14
# activations of 256 rows (6 MB) stay in cache, which made 1.4x the decodes per second of whole
# 32,768-row chunks (benchmarks/conv_decode.py). The fast paths take about CPU_HEAD_ROWS (whole
# draws of the batch's images): buffers of 4,096 rows (13 MB of logits) made them 1.3x to 1.5x as
# fast as whole chunks, where 256 rows gained less (benchmarks/bound_paths.py --head-rows). A GPU
# takes each chunk at once (one launch per layer).
CPU_DECODE_ROWS = 256
CPU_HEAD_ROWS = 4096


def _in_draw_slices(log_px, draws: int):
    """``log_px`` of z (kc, n, d) taken ``draws`` draws at a time: the same z and the same sums per
    row, in buffers a slice long."""
    return lambda z: torch.cat([log_px(part) for part in z.split(draws)])


def _log_px_generic(model: VAE, x: Tensor):
    """log p(x | z) for z (kc, n, d), by the decoder's logits and the model's likelihood."""
    dtype, n = model.dtype, len(x)

    def log_px(z: Tensor) -> Tensor:
        if z.device.type != "cpu":
            return -model.reconstruction_nll(model.decode_logits(z.to(dtype)).float(), x)
        flat = z.reshape(-1, z.shape[-1]).to(dtype)  # row r is image r % n
        out = torch.empty(len(flat), device=z.device)
        for start in range(0, len(flat), CPU_DECODE_ROWS):
            rows = flat[start : start + CPU_DECODE_ROWS]
            images = x[torch.arange(start, start + len(rows)) % n]
            out[start : start + len(rows)] = -model.reconstruction_nll(model.decode_logits(rows).float(), images)
        return out.view(z.shape[:-1])

    return log_px


def _log_px_linear_head(model: VAE, x: Tensor, head):
    """log p(x | z) when logits l = W h + b for the decoder's last hidden layer h: written for
    speed, since the GEMMs are the only work that has to remain (docs/performance.md).
    log p(x | z) = sum_j x_j l_j - softplus(l_j), and softplus(l) = (l + |l|) / 2 - log sigmoid(|l|),
    so everything linear in l is a product with h, never a k x pixels pass:
    sum_j (x_j - 1/2) l_j = h . W^T (x - 1/2) + b . (x - 1/2). What is left per logit is |l| and
    ``sum_log_sigmoid_``, in place. A continuous Bernoulli adds log C(l) per logit, a function of |l|
    too (``sum_log_sigmoid_and_cb_normalizer_``). The buffers are reused across chunks (and, on a
    CPU, slices) because fresh tensors of a chunk's size (100 MB) cost page faults every time."""
    hidden, act_, w, b = _head_in_fp32(head)
    n = len(x)
    h_coef = x @ w - 0.5 * w.sum(0)  # (n, hidden)
    b_coef = x @ b - 0.5 * b.sum()  # (n,)
    continuous = isinstance(model.likelihood, ContinuousBernoulli)
    buffers: list[Tensor] = []

    def log_px(z: Tensor) -> Tensor:
        kc, rows = z.shape[0], z.shape[0] * n
        h = _run_hidden(z, hidden, act_, buffers, pixel_buffers=1 + continuous, pixels=w.shape[0])
        logits = buffers[len(hidden)][:rows]
        l_abs = torch.addmm(b, h, w.t(), out=logits).abs_()
        linear_part = h.view(kc, n, -1).mul_(h_coef).sum(-1) + b_coef  # h is not needed after this
        half_abs = 0.5 * l_abs.sum(-1).view(kc, n)
        if continuous:
            per_logit = sum_log_sigmoid_and_cb_normalizer_(l_abs, buffers[-1][:rows])
        else:
            per_logit = sum_log_sigmoid_(l_abs)
        return linear_part - half_abs + per_logit.view(kc, n)

    return log_px


def _log_px_gaussian_head(model: VAE, x: Tensor, head):
    """log p(x | z) of a Gaussian decoder whose logits are linear in its last hidden layer:
    -1/2 sum_j (x_j - sigmoid(l_j))^2 / v_j + log v_j + log 2 pi. Nothing here is linear in l, so
    the gain over the generic path is its buffers: three in-place passes and one matrix-vector
    product, where the generic path allocates a temporary per operation (1.7x as fast on a CPU,
    both in slices that stay in cache: benchmarks/bound_paths.py). The square is taken of the
    difference, never expanded (x^2 / v - 2 x s / v + s^2 / v cancels badly in fp32 when v is near
    its floor of e^-9)."""
    hidden, act_, w, b = _head_in_fp32(head)
    log_var = model.likelihood.log_var.float().clamp(*Gaussian.LOG_VAR_RANGE)
    inv_var = torch.exp(-log_var)
    constant = -0.5 * (log_var.sum() + x.shape[1] * math.log(2 * math.pi))
    n = len(x)
    buffers: list[Tensor] = []

    def log_px(z: Tensor) -> Tensor:
        kc, rows = z.shape[0], z.shape[0] * n
        h = _run_hidden(z, hidden, act_, buffers, pixel_buffers=1, pixels=w.shape[0])
        diff = torch.addmm(b, h, w.t(), out=buffers[-1][:rows]).sigmoid_()
        diff.view(kc, n, -1).sub_(x).square_()
        return constant - 0.5 * (diff @ inv_var).view(kc, n)

    return log_px


def _head_in_fp32(head) -> tuple[list[tuple[Tensor, Tensor]], object, Tensor, Tensor]:
    """(hidden layers as (W^T, b) pairs, their in-place activation, output W, output b), in fp32."""
    hidden_layers, activation, output = head
    hidden = [(layer.weight.float().t(), layer.bias.float()) for layer in hidden_layers]
    return hidden, IN_PLACE_ACTIVATIONS[activation], output.weight.float(), output.bias.float()


def _run_hidden(
    z: Tensor, hidden: list[tuple[Tensor, Tensor]], act_, buffers: list[Tensor], pixel_buffers: int, pixels: int
) -> Tensor:
    """The decoder's hidden layers on z (kc, n, d) flattened to rows, each into its buffer. ``buffers``
    holds one per layer and then ``pixel_buffers`` of ``pixels`` columns for the caller, made anew only
    when a chunk has more rows than they do: reused by every chunk of a bound."""
    rows = z.shape[0] * z.shape[1]
    if not buffers or buffers[-1].shape[0] < rows:
        buffers[:] = [torch.empty(rows, wt.shape[1], device=z.device) for wt, _ in hidden]
        buffers.extend(torch.empty(rows, pixels, device=z.device) for _ in range(pixel_buffers))
    h = z.reshape(rows, -1).float()
    for (wt, bias), buffer in zip(hidden, buffers, strict=False):
        h = act_(torch.addmm(bias, h, wt, out=buffer[:rows]))
    return h
