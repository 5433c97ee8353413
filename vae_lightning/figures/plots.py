"""Pure figure builders: data (or a model) in, a matplotlib Figure or an image tensor out;
no files, no global pyplot state."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from torchvision.utils import make_grid

from vae_lightning.figures.pca import principal_directions


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    # 'valid' then left-pad, so the smoothed curve lags instead of bending at the ends
    valid = np.convolve(values, kernel, mode="valid")
    return np.concatenate([np.full(window - 1, np.nan), valid])


def loss_curves(
    step_rec: Sequence[float],
    step_kl: Sequence[float],
    epochs: Sequence[Mapping[str, float]],
) -> Figure:
    """A 2 x 2 figure: reconstruction loss (-log p(x|z), the BCE for a Bernoulli decoder) and KL per
    image, against optimizer step (every step, with a running mean) and against epoch (train and
    validation)."""
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    steps = np.arange(1, len(step_rec) + 1)
    window = max(1, len(steps) // 100)
    for row, (key, label, values) in enumerate(
        (("rec", "reconstruction loss, -log p(x|z)", step_rec), ("kl", "KL divergence", step_kl))
    ):
        values = np.asarray(values, dtype=float)
        ax = axes[row, 0]
        ax.plot(steps, values, lw=0.5, alpha=0.35, color="tab:blue", label="per step")
        if window > 1:
            ax.plot(steps, _smooth(values, window), lw=1.5, color="tab:blue", label=f"running mean ({window} steps)")
        ax.set(xlabel="optimizer step", ylabel=f"{label} per image", title=f"{label} per step")
        finite = values[np.isfinite(values)]
        if len(finite):
            lo, hi = np.percentile(finite, [0.5, 99.0])
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo))
        ax.legend()
        ax = axes[row, 1]
        for stage, style in (("train", "-"), ("val", "--")):
            points = [(e["epoch"], e[f"{stage}/{key}"]) for e in epochs if e.get(f"{stage}/{key}") is not None]
            if points:
                x, y = zip(*points, strict=True)
                marker = ("o" if stage == "train" else "s") if len(points) <= 30 else None  # dots hide a long run
                ax.plot(x, y, style, marker=marker, ms=3, label=stage)
        ax.set(xlabel="epoch", ylabel=f"{label} per image", title=f"{label} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        for ax in axes[row]:
            ax.grid(alpha=0.3)
    return fig


@torch.no_grad()
def sample_grid(model: torch.nn.Module, n: int, nrow: int, seed: int) -> torch.Tensor:
    """Decoded draws from the prior as an image grid; the same seed gives the same z on any device."""
    z = model.sample_z(n, torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    images = _digits(model, z)
    model.train(was_training)
    return digit_grid(images, nrow)


def upscale(image: torch.Tensor, scale: int) -> torch.Tensor:
    """Nearest-neighbour enlargement of a (C, H, W) image: every pixel stays a crisp square."""
    return image.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def _as_input(model: torch.nn.Module, t: Tensor) -> Tensor:
    """``t`` on the model's device and in its dtype (weights may be bf16 or fp16)."""
    weight = next(model.parameters())
    return t.to(device=weight.device, dtype=weight.dtype)


def _digits(model: torch.nn.Module, z: Tensor) -> Tensor:
    """Decoded pixel probabilities as (n, 1, side, side) on the CPU."""
    side = math.isqrt(model.input_dim)
    return model.decode(_as_input(model, z)).float().view(len(z), 1, side, side).cpu()


def digit_grid(images: Tensor, nrow: int) -> Tensor:
    """(n, 784) or (n, 1, 28, 28) images in [0, 1] as one grid with white 2-px gutters."""
    side = math.isqrt(images[0].numel())
    return make_grid(images.float().reshape(-1, 1, side, side).cpu(), nrow=nrow, padding=2, pad_value=1.0)


@torch.no_grad()
def reconstruction_grid(model: torch.nn.Module, x: Tensor, nrow: int = 10) -> Tensor:
    """Rows of test digits, each above its reconstruction decode(E[z|x])."""
    mu, _ = model.encode(_as_input(model, x))
    recon = model.decode(mu).float()
    rows = []
    for start in range(0, len(x), nrow):
        rows += [x[start : start + nrow].float(), recon[start : start + nrow]]
    return digit_grid(torch.cat(rows), nrow)


@torch.no_grad()
def parameter_and_mean_grid(model: torch.nn.Module, x: Tensor, seed: int) -> Tensor:
    """For the continuous Bernoulli, whose mean is not its parameter: test digits; their
    reconstructions (at E[z|x]) drawn as lambda = sigmoid(logits) and as the mean; then as many
    draws from the prior, drawn both ways."""
    mu, _ = model.encode(_as_input(model, x))
    rows = [x.float().cpu()]
    for z in (mu, model.sample_z(len(x), torch.Generator().manual_seed(seed))):
        logits = model.decode_logits(z).float()
        rows += [torch.sigmoid(logits).cpu(), model.likelihood.mean(logits).cpu()]
    return digit_grid(torch.cat(rows), len(x))


@torch.no_grad()
def interpolation_grid(model: torch.nn.Module, x_from: Tensor, x_to: Tensor, steps: int = 10) -> Tensor:
    """One row per pair: decoded points on the straight line from E[z|a] to E[z|b]."""
    mu_a, _ = model.encode(_as_input(model, x_from))
    mu_b, _ = model.encode(_as_input(model, x_to))
    t = torch.linspace(0, 1, steps, device=mu_a.device).view(1, steps, 1)
    z = (mu_a.unsqueeze(1) * (1 - t) + mu_b.unsqueeze(1) * t).reshape(-1, mu_a.shape[1])
    return digit_grid(_digits(model, z), steps)


@torch.no_grad()
def manifold_grid(model: torch.nn.Module, n: int = 20) -> Tensor:
    """For a 2-D latent space: digits decoded on an n x n grid of Gaussian quantiles
    (Kingma & Welling 2014, fig. 4); z1 grows to the right, z2 upwards."""
    q = manifold_quantiles(n)
    z2, z1 = torch.meshgrid(q.flip(0), q, indexing="ij")
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=1)
    return digit_grid(_digits(model, z), n)


def manifold_quantiles(n: int = 20) -> Tensor:
    """The values of z1 (left to right) and of z2 (bottom to top) on manifold_grid's axes."""
    return torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))


def latent_scatter(mu: Tensor, labels: Tensor, class_names: Sequence[str], label_name: str = "class") -> Figure:
    """E[z|x] of test images coloured by class: z against the label when the latent space is
    1-D, its two dimensions when 2-D, else its first two principal components."""
    mu = mu.double().cpu()
    if mu.shape[1] == 1:  # one dimension: spread the points by label so the classes stay apart
        jitter = torch.rand(len(mu), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.6 - 0.3
        points, axis = torch.stack([mu[:, 0], labels.cpu().double() + jitter], 1), ("z[0]", "label (jittered)")
    elif mu.shape[1] == 2:
        points, axis = mu, ("z[0]", "z[1]")
    else:
        mean, s, v, total = principal_directions(mu, 2)
        points = (mu - mean) @ v.T
        share = (s**2 / total).tolist()
        axis = (f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%} of variance)")
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels.cpu(), cmap="tab10", s=3, alpha=0.6, vmin=-0.5, vmax=9.5)
    bar = fig.colorbar(scatter, ax=ax, ticks=range(10), label=label_name)
    bar.ax.set_yticklabels(class_names)
    ax.set(xlabel=axis[0], ylabel=axis[1], title=f"E[z|x] of {len(points)} test images (latent_dim={mu.shape[1]})")
    ax.grid(alpha=0.3)
    return fig


# margins, in pixels, around a grid drawn pixel for pixel by labelled_grid; the grid's top left
# corner is at (GRID_LEFT, GRID_TOP) in the PNG
GRID_LEFT, GRID_TOP, _RIGHT, _BOTTOM, _DPI = 150, 34, 12, 44, 100
_CELL = 30  # digit_grid's 28-px digits and 2-px gutters


def labelled_grid(
    grid: Tensor,
    scale: int,
    title: str,
    row_labels: Sequence[str],
    column_labels: Sequence[str] = (),
    left_title: str = "",
    bottom_title: str = "",
) -> Figure:
    """A digit grid drawn unresampled (each pixel ``scale`` x ``scale``, at a fixed offset from
    the top left: ``(GRID_LEFT, GRID_TOP)``), a label beside each row and under each column, and a title."""
    image = upscale(grid[:1], scale)[0].numpy()
    height, width = image.shape
    fig_w, fig_h = width + GRID_LEFT + _RIGHT, height + GRID_TOP + _BOTTOM
    fig = Figure(figsize=(fig_w / _DPI, fig_h / _DPI), dpi=_DPI)
    fig.figimage(image, xo=GRID_LEFT, yo=_BOTTOM, cmap="gray", vmin=0, vmax=1, origin="upper")

    def text(x: float, y_from_top: float, s: str, **kw) -> None:
        fig.text(x / fig_w, 1 - y_from_top / fig_h, s, **{"fontsize": 9, **kw})

    text(GRID_LEFT, GRID_TOP / 2, title, ha="left", va="center", fontsize=10)
    centre = scale * (2 + _CELL // 2 - 1)
    for i, label in enumerate(row_labels):
        text(GRID_LEFT - 8, GRID_TOP + centre + scale * _CELL * i, label, ha="right", va="center")
    for j, label in enumerate(column_labels):
        text(GRID_LEFT + centre + scale * _CELL * j, GRID_TOP + height + 4, label, ha="center", va="top")
    if left_title:
        text(12, GRID_TOP + height / 2, left_title, ha="left", va="center", rotation=90)
    if bottom_title:
        text(GRID_LEFT + width / 2, fig_h - 4, bottom_title, ha="center", va="bottom")
    return fig
