"""Pure figure builders: data in, matplotlib Figure out; no files, no global pyplot state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    # 'valid' then left-pad, so the smoothed curve lags instead of bending at the ends
    valid = np.convolve(values, kernel, mode="valid")
    return np.concatenate([np.full(window - 1, np.nan), valid])


def loss_curves(
    step_bce: Sequence[float],
    step_kl: Sequence[float],
    epochs: Sequence[Mapping[str, float]],
) -> Figure:
    """A 2 x 2 figure: reconstruction loss (BCE) and KL per image, against optimizer step
    (every step, with a running mean) and against epoch (train and validation)."""
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    steps = np.arange(1, len(step_bce) + 1)
    window = max(1, len(steps) // 100)
    for row, (key, label, values) in enumerate(
        (("bce", "reconstruction loss (BCE)", step_bce), ("kl", "KL divergence", step_kl))
    ):
        values = np.asarray(values, dtype=float)
        ax = axes[row, 0]
        ax.plot(steps, values, lw=0.5, alpha=0.35, color="tab:blue", label="per step")
        if window > 1:
            ax.plot(steps, _smooth(values, window), lw=1.5, color="tab:blue", label=f"running mean ({window} steps)")
        ax.set(xlabel="optimizer step", ylabel=f"{label} per image", title=f"{label} per step")
        if len(values):
            lo, hi = np.nanpercentile(values, [0.5, 99.0])
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo))
        ax.legend()
        ax = axes[row, 1]
        for stage, style in (("train", "-o"), ("val", "--s")):
            points = [(e["epoch"], e[f"{stage}/{key}"]) for e in epochs if e.get(f"{stage}/{key}") is not None]
            if points:
                x, y = zip(*points, strict=True)
                ax.plot(x, y, style, ms=3, label=stage)
        ax.set(xlabel="epoch", ylabel=f"{label} per image", title=f"{label} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        for ax in axes[row]:
            ax.grid(alpha=0.3)
    return fig
