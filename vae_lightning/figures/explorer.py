"""``report.html``: one self-contained page of a run, its settings, metrics and figures, with a
latent explorer whose decoder (weights embedded) runs in the page. No network, no external file."""

from __future__ import annotations

import base64
import html
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vae_lightning.figures.pca import principal_directions
from vae_lightning.model.vae import VAE
from vae_lightning.names import ACTIVE_UNITS, FINAL_METRICS
from vae_lightning.outputs import read_overrides, replaced_atomically

FIGURES = ("loss_curves", "samples", "samples_100", "reconstructions", "interpolations", "latent_scatter", "manifold",
           "lambda_and_mean")  # fmt: skip
GALLERY_PER_CLASS = 10
MAX_SLIDERS = 32  # beyond this many latent dimensions, sliders follow the leading principal directions


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _float32(t: Tensor) -> str:
    return _b64(t.detach().float().cpu().numpy().astype("<f4"))


def page_ops(model: VAE) -> list[dict[str, Any]]:
    """The decoder's operations for the page's evaluator: each tensor as little-endian float32 with
    its shape, every other setting as it is."""
    return [
        {k: {"shape": list(v.shape), "data": _float32(v)} if isinstance(v, Tensor) else v for k, v in op.items()}
        for op in model.page_ops()
    ]


def explorer_data(model: VAE, test_x: Tensor, test_y: Tensor, class_names: list[str]) -> dict[str, Any]:
    """What the page's decoder and gallery need: the decoder's operations with their weights,
    some test images (bytes) with their E[z|x], and the sliders' directions."""
    picks = [int(i) for c in range(len(class_names)) for i in (test_y == c).nonzero()[:GALLERY_PER_CLASS, 0]]
    with torch.no_grad():
        weight = next(model.parameters())
        mu_all = torch.cat([model.encode(xb.to(weight))[0].float().cpu() for xb in test_x.split(1000)])
    d = model.latent_dim
    if d <= MAX_SLIDERS:
        origin, basis = torch.zeros(d), list(torch.eye(d))
        names, caption = [f"z[{i}]" for i in range(d)], "one slider per latent dimension"
    else:  # the directions along which the test set's E[z|x] varies most, in standard deviations
        mean, s, v, _ = principal_directions(mu_all, MAX_SLIDERS)
        std = s / (len(mu_all) - 1) ** 0.5
        origin, basis = mean, list(v * std.unsqueeze(1))
        names = [f"PC {k + 1}" for k in range(MAX_SLIDERS)]
        caption = f"the {MAX_SLIDERS} leading principal directions of the test set's E[z|x], in standard deviations"
    images = (test_x[picks].float().cpu() * 255).round().to(torch.uint8).numpy()
    return {
        "input_dim": model.input_dim, "latent_dim": d, "decoder": page_ops(model),
        "likelihood": model.settings["likelihood"], "page_mean": model.likelihood.page_mean,
        "lambda_differs_from_mean": model.likelihood.lambda_differs_from_mean, "prior": prior_mixture(model),
        "prior_name": model.settings["prior"],
        "origin": _float32(origin), "basis": [_float32(b) for b in basis], "basis_names": names,
        "basis_caption": caption, "test_images": _b64(images), "test_means": _float32(mu_all[picks]),
        "test_labels": test_y[picks].tolist(), "class_names": class_names,
    }  # fmt: skip


def prior_mixture(model: VAE) -> dict[str, Any] | None:
    """p(z) as the Gaussian mixture the page's "random z" draws from (the prior in use, as
    ``VAE.sample_z``); None for a prior that is no such mixture (the page then offers none)."""
    try:
        with torch.no_grad():
            means, logvars, log_weights = model.prior.page_mixture(model.latent_dim, model.encode)
    except NotImplementedError:
        return None
    return {
        "components": len(means), "means": _float32(means.float().cpu()),
        "stds": _float32(torch.exp(0.5 * logvars.float().cpu())),
        "weights": _float32(torch.softmax(log_weights.float().cpu(), 0)),
    }  # fmt: skip


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _shown(key: str, value: float, metrics: dict[str, Any]) -> str:
    if key == ACTIVE_UNITS:  # a count, of the latent dimensions
        return f"{value:.0f} of {metrics.get('latent_dim', '?')}"
    return f"{value:.3f}"


def _title_and_overrides(run_dir: Path) -> tuple[str, str]:
    """The run's name (a multirun's job dir is its number alone: its sweep's name goes with it) and
    the command-line overrides it ran with, as Hydra kept them; none when the file is unreadable."""
    title = f"{run_dir.parent.name} job {run_dir.name}" if run_dir.name.isdigit() else run_dir.name
    return title, " ".join(read_overrides(run_dir) or [])


def report_html(
    run_dir: Path, model: VAE, test_x: Tensor, test_y: Tensor, class_names: list[str], data_dir: str | None = None
) -> str:
    """The page for the run in ``run_dir`` (its metrics.json, figures and .hydra/config.yaml,
    whichever exist) and the weights of ``model``."""
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    rows = [
        f"<tr><td>{html.escape(key)}</td><td class='num'>{_shown(key, metrics[key], metrics)}</td></tr>"
        for key in FINAL_METRICS
        if isinstance(metrics.get(key), int | float)
    ]
    figures = [
        f"<figure><img class='figure' alt='{name}' src='{_png(run_dir / f'{name}.png')}'>"
        f"<figcaption class='caption'>{name}.png</figcaption></figure>"
        for name in FIGURES
        if (run_dir / f"{name}.png").is_file()
    ]
    config = run_dir / ".hydra" / "config.yaml"
    data = json.dumps(explorer_data(model, test_x, test_y, class_names)).replace("</", "<\\/")
    title, overrides = _title_and_overrides(run_dir)
    subtitle = f"{overrides} · " if overrides else ""
    subtitle += f"{run_dir} · checkpoint {metrics.get('checkpoint', '?')} · {metrics.get('epochs', '?')} epochs"
    if data_dir:  # the settings may say data_dir: null (found by VAE_DATA_DIR or the default)
        subtitle += f" · data from {data_dir}"
    page = resources.files("vae_lightning.figures").joinpath("explorer.html").read_text()
    parts = {
        "__TITLE__": html.escape(title),
        "__SUBTITLE__": html.escape(subtitle),
        "__METRICS__": "<table>" + "".join(rows) + "</table>" if rows else "<p>no metrics.json</p>",
        "__FIGURES__": "".join(figures) or "<p>no figures</p>",
        "__CONFIG__": html.escape(config.read_text()) if config.is_file() else "(no .hydra/config.yaml)",
        "__DATA__": data,
    }
    return re.sub("__[A-Z]+__", lambda m: parts.get(m.group(0), m.group(0)), page)  # one pass: no part is re-read


def write_report(run_dir: Path, model: VAE, datamodule: Any) -> Path:
    """Write ``run_dir/report.html`` whole; ``datamodule`` holds the test set and its class names."""
    path = run_dir / "report.html"
    data_dir = str(getattr(datamodule, "data_dir", "") or "") or None
    page = report_html(run_dir, model, datamodule.test_x, datamodule.test_y, datamodule.class_names, data_dir)
    with replaced_atomically(path) as partial:
        partial.write_text(page)
    return path
