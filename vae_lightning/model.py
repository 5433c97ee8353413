"""The reference notebook's VAE in plain torch: model, ELBO and IWAE objectives, importance-weighted bound."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

INIT_SCHEMES = ("default", "xavier_normal", "normal")


class VAE(nn.Module):
    """784 -> 400 (ReLU) -> (mu, logvar) in R^20; 20 -> 400 (ReLU) -> 784 (sigmoid).

    Layer names match the reference notebook's class, so its state_dict loads as is.
    """

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dim: int = 400,
        latent_dim: int = 20,
        init: str = "default",
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.input_dim, self.hidden_dim, self.latent_dim = input_dim, hidden_dim, latent_dim
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)
        self.fc3 = nn.Linear(latent_dim, hidden_dim)
        self.fc4 = nn.Linear(hidden_dim, input_dim)
        init_weights(self, init, init_std)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h1 = torch.relu(self.fc1(x))
        return self.fc_mu(h1), self.fc_logvar(h1)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        std = torch.exp(0.5 * logvar)
        if generator is None:  # the reference notebook's draw, from the global generator
            return mu + torch.randn_like(std) * std
        return mu + torch.randn(std.shape, generator=generator, device=std.device, dtype=std.dtype) * std

    def decode_logits(self, z: Tensor) -> Tensor:
        return self.fc4(torch.relu(self.fc3(z)))

    def decode(self, z: Tensor) -> Tensor:
        """Pixel probabilities, as the reference notebook's ``decode``."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar


def init_weights(model: nn.Module, scheme: str, std: float = 0.01) -> None:
    """``default`` keeps PyTorch's init; ``xavier_normal`` is a fan-scaled Gaussian;
    ``normal`` is N(0, std) (with std=0.01 it trains markedly slower, see README)."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"model.init={scheme!r} is not one of {', '.join(INIT_SCHEMES)}")
    if scheme == "default":
        return
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            if scheme == "xavier_normal":
                nn.init.xavier_normal_(layer.weight)
            else:
                nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)


def _at_least_fp32(t: Tensor) -> Tensor:
    # under autocast the layers run in fp16/bf16; the sums over 784 pixels must not
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _sum_log_sigmoid_(magnitudes: Tensor) -> Tensor:
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
    sum_j relu(l_j) - x_j l_j - log sigmoid(|l_j|) (``_sum_log_sigmoid_`` says why).
    The gradient is the library's: (sigmoid(l) - x) per pixel.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(logits, x)
        magnitude = logits.abs()
        linear = 0.5 * (logits.sum(-1) + magnitude.sum(-1)) - (x * logits).sum(-1)  # relu(l) = (l + |l|) / 2
        return linear - _sum_log_sigmoid_(magnitude)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, x = ctx.saved_tensors
        return (torch.sigmoid(logits) - x) * grad.unsqueeze(-1), None


def bce_from_logits(logits: Tensor, x: Tensor) -> Tensor:
    """Per-image BCE of sigmoid(logits) against x, summed over pixels; at least fp32 and
    stable for any logit. ``.sum()`` of it is the reference notebook's ``binary_cross_entropy(..., "sum")``."""
    logits = _at_least_fp32(logits)
    return _PixelSummedBCE.apply(logits, x.to(logits.dtype))


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """Per-image closed-form KL(N(mu, exp(logvar)) || N(0, I)), at least fp32."""
    mu, logvar = _at_least_fp32(mu), _at_least_fp32(logvar)
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def elbo_terms(model: VAE, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Per-image (BCE, KL) of one reparameterised pass; the reference notebook's loss is their
    total sum."""
    mu, logvar = model.encode(x)
    logits = model.decode_logits(model.reparameterize(mu, logvar, generator))
    return bce_from_logits(logits, x), kl_divergence(mu, logvar)


def log_importance_weights(
    model: VAE, x: Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """log w_i = log p(x | z_i) + log p(z_i) - log q(z_i | x) for k draws z_i ~ q(z | x) per image,
    as (log_w, bce) of shape (k, images), with the encoder's (mu, logvar)."""
    mu, logvar = model.encode(x)
    eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + eps * torch.exp(0.5 * logvar)
    bce = bce_from_logits(model.decode_logits(z), x.expand(k, *x.shape))  # -log p(x | z_i)
    z, eps, logvar32 = _at_least_fp32(z), _at_least_fp32(eps), _at_least_fp32(logvar)
    # log p(z) - log q(z | x) for z = mu + std * eps; the (2 pi)^(d/2) of both cancel
    log_prior_over_posterior = 0.5 * (eps.pow(2) - z.pow(2)).sum(-1) + 0.5 * logvar32.sum(-1)
    return log_prior_over_posterior - bce, bce, mu, logvar


def iwae_terms(
    model: VAE, x: Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (BCE, KL, -L_k): BCE averaged over the k samples, the closed-form KL, and the
    negative k-sample importance-weighted bound L_k = log (1/k sum_i w_i), the IWAE objective
    (Burda et al. 2015, eq. 8). With k = 1 it is the ELBO, computed exactly as ``elbo_terms``
    (closed-form KL, lower variance), so k = 1 trains as the reference notebook does."""
    if k == 1:
        bce, kl = elbo_terms(model, x, generator)
        return bce, kl, bce + kl
    log_w, bce, mu, logvar = log_importance_weights(model, x, k, generator)
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)
    return bce.mean(0), kl_divergence(mu, logvar), -bound


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
    folded into a running log-sum-exp. The decoder runs in fp32 whatever the weights' dtype.

    Written for speed, since the two GEMMs are the only work that has to remain (docs/performance.md).
    log p(x | z) = sum_j x_j l_j - softplus(l_j) over the logits l, and
    softplus(l) = (l + |l|) / 2 - log sigmoid(|l|), so everything linear in l is a product with
    the decoder's last hidden layer h, never a k x 784 pass: sum_j (x_j - 1/2) l_j =
    h . W4^T (x - 1/2) + b4 . (x - 1/2). What is left per logit is |l| and ``_sum_log_sigmoid_``,
    in place. The buffers are reused across chunks because fresh 100 MB tensors cost page faults
    every time.
    """
    dtype = model.fc1.weight.dtype  # the layers may hold bf16 or fp16 weights; the sums stay fp32+
    mu, logvar = (t.float() for t in model.encode(x.to(dtype)))
    std = torch.exp(0.5 * logvar)
    n, d = mu.shape
    x = x.float()
    w3, b3 = model.fc3.weight.float(), model.fc3.bias.float()
    w4, b4 = model.fc4.weight.float(), model.fc4.bias.float()
    pixels = w4.shape[0]
    h_coef = x @ w4 - 0.5 * w4.sum(0)  # (n, hidden)
    b_coef = x @ b4 - 0.5 * b4.sum()  # (n,)
    log_norm = 0.5 * d * math.log(2 * math.pi)
    log_q_const = -0.5 * logvar.sum(-1) - log_norm  # log q(z|x) = this - |eps|^2 / 2
    running = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)
    per_chunk = max(1, chunk_rows // n)
    hidden_buf = torch.empty(per_chunk * n, w3.shape[0], device=x.device)
    logits_buf = torch.empty(per_chunk * n, pixels, device=x.device)
    for start in range(0, k, per_chunk):
        kc = min(per_chunk, k - start)
        rows = kc * n
        eps = torch.randn(kc, n, d, device=x.device, generator=generator)
        z = mu + std * eps
        h = torch.addmm(b3, z.view(rows, d), w3.t(), out=hidden_buf[:rows]).relu_()
        l_abs = torch.addmm(b4, h, w4.t(), out=logits_buf[:rows]).abs_()
        linear_part = h.view(kc, n, -1).mul_(h_coef).sum(-1) + b_coef  # h is not needed after this
        half_abs = 0.5 * l_abs.sum(-1).view(kc, n)
        log_px = linear_part - half_abs + _sum_log_sigmoid_(l_abs).view(kc, n)
        log_pz = -0.5 * z.pow(2).sum(-1) - log_norm
        log_qz = log_q_const - 0.5 * eps.pow(2).sum(-1)
        log_w = (log_px + log_pz - log_qz).double()  # (kc, n)
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
    return running - math.log(k)
