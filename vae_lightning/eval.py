"""``python -m vae_lightning.eval ckpt_path=<checkpoint or run dir>``: the test ELBO, the
importance-weighted bound, active units and the figures people look at."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from vae_lightning.errors import UserError
from vae_lightning.model import VAE, active_units, bce_from_logits, iw_log_likelihood, kl_divergence
from vae_lightning.outputs import describe_disk_error, replaced_atomically, write_json
from vae_lightning.plots import (
    interpolation_grid,
    latent_scatter,
    manifold_grid,
    reconstruction_grid,
    sample_grid,
    upscale,
)

LIKELIHOOD_NOTE = (
    "MNIST pixels here are continuous in [0, 1], so test/iw_nll is the Bernoulli 'likelihood' of the "
    "seed's loss (nats per image), not the NLL of binarized MNIST that papers report"
)
INTERPOLATION_PAIRS = [(0, 6), (1, 7), (2, 3), (3, 8), (4, 9), (5, 6), (7, 1), (9, 4)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run dir whose best checkpoint (by val/loss) is wanted."""
    p = Path(path).expanduser()
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        best = sorted(folder.glob("epoch_*.ckpt"))
        if len(best) > 1 and (folder / "last.ckpt").is_file():  # ModelCheckpoint knows which is best
            state = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)
            paths = [v.get("best_model_path") for k, v in state.get("callbacks", {}).items() if "ModelCheckpoint" in k]
            best = [Path(b) for b in paths if b and Path(b).is_file()] or best
        candidates = best[:1] or ([folder / "last.ckpt"] if (folder / "last.ckpt").is_file() else [])
        if not candidates:
            raise UserError(f"no checkpoint in {folder}; pass ckpt_path=<file.ckpt> or a run dir with checkpoints/")
        return candidates[0]
    if not p.is_file():
        raise UserError(f"checkpoint {p} does not exist; pass ckpt_path=<file.ckpt> or a training run dir")
    return p


def load_model(ckpt: Path, device: torch.device) -> VAE:
    from vae_lightning.module import VAEModule  # Lightning only to read its checkpoint format

    try:
        module = VAEModule.load_from_checkpoint(ckpt, map_location=device, weights_only=False)
    except Exception as err:  # truncated file, not a checkpoint of this project
        raise UserError(f"cannot load {ckpt} as a vae_lightning checkpoint ({type(err).__name__}: {err})") from err
    return module.model.eval()


def _first_of_each_digit(labels: torch.Tensor, occurrence: int) -> list[int]:
    return [int((labels == d).nonzero()[occurrence]) for d in range(10)]


@torch.no_grad()
def evaluate(
    model: VAE,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    out_dir: str | Path,
    k: int = 5000,
    batch_size: int = 100,
    chunk_rows: int = 32768,
    seed: int = 0,
    sample_seed: int = 2024,
    scale: int = 3,
    writer: Any = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    ten_samples: bool = True,
) -> dict[str, Any]:
    """Metrics and figures of ``model`` on the test set, written to ``out_dir`` (and to a
    TensorBoard ``writer`` if given); returns what ``metrics.json`` holds. ``ten_samples=False``
    leaves ``samples.png`` to the training run's SampleGrid callback."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    device = next(model.parameters()).device
    test_x = test_x.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    bce, kl, mus = [], [], []
    for xb in test_x.split(batch_size):
        mu, logvar = model.encode(xb)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, device=device, generator=gen)
        bce.append(bce_from_logits(model.decode_logits(z), xb))
        kl.append(kl_divergence(mu, logvar))
        mus.append(mu)
    mu_all = torch.cat(mus)
    start = time.perf_counter()
    iw, done, next_report = [], 0, 0.1
    for xb in test_x.split(batch_size):
        iw.append(iw_log_likelihood(model, xb, k, chunk_rows, gen))
        done += len(xb)
        if k >= 1000 and done / len(test_x) >= next_report:  # long runs say how far they are
            print(f"  importance-weighted bound, k={k}: {done}/{len(test_x)} images, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
            next_report += 0.1
    iw = torch.cat(iw)
    iw_seconds = time.perf_counter() - start
    bce_mean, kl_mean = torch.cat(bce).mean().item(), torch.cat(kl).mean().item()
    metrics: dict[str, Any] = {
        "test/bce": bce_mean,
        "test/kl": kl_mean,
        "test/loss": bce_mean + kl_mean,
        "test/iw_nll": -iw.mean().item(),
        "k": k,
        "active_units": active_units(mu_all),
        "latent_dim": model.latent_dim,
        "test_images": len(test_x),
        "iw_seconds": round(iw_seconds, 2),
        "note": LIKELIHOOD_NOTE,
        **(extra or {}),
    }
    write_json(out / "metrics.json", metrics)

    labels = test_y.cpu()
    picks = _first_of_each_digit(labels, 0) + _first_of_each_digit(labels, 1)
    images = {
        "reconstructions": reconstruction_grid(model, test_x[picks]),
        "interpolations": interpolation_grid(
            model,
            test_x[[_first_of_each_digit(labels, 0)[a] for a, _ in INTERPOLATION_PAIRS]],
            test_x[[_first_of_each_digit(labels, 0)[b] for _, b in INTERPOLATION_PAIRS]],
        ),
        "samples_100": sample_grid(model, 100, 10, sample_seed),
    }
    if ten_samples:
        images["samples"] = sample_grid(model, 10, 10, sample_seed)
    if model.latent_dim == 2:
        images["manifold"] = manifold_grid(model)
    for name, grid in images.items():
        with replaced_atomically(out / f"{name}.png") as partial:
            save_image(upscale(grid, scale), partial, format="png")
    scatter = latent_scatter(mu_all, labels)
    with replaced_atomically(out / "latent_scatter.png") as partial:
        scatter.savefig(partial, dpi=110, format="png")
    if writer is not None:
        for name, grid in images.items():
            writer.add_image(f"eval/{name}", grid, step)
        writer.add_figure("eval/latent_scatter", scatter, step)
        for key in ("test/bce", "test/kl", "test/loss", "test/iw_nll", "active_units"):
            writer.add_scalar(f"eval/{key}", metrics[key], step)
    return metrics


def report(metrics: dict[str, Any], out_dir: Path) -> None:
    print(f"\nEvaluation in {out_dir}")
    for key in ("test/bce", "test/kl", "test/loss", "test/iw_nll"):
        print(f"  {key:<12} {metrics[key]:9.3f}")
    print(f"  active units {metrics['active_units']} of {metrics['latent_dim']}   (k = {metrics['k']})")
    print(f"  note: {LIKELIHOOD_NOTE}")


def run(cfg: DictConfig) -> dict[str, Any]:
    from torch.utils.tensorboard import SummaryWriter

    from vae_lightning.data import MNISTDataModule

    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise UserError("no checkpoint given; run python -m vae_lightning.eval ckpt_path=<file.ckpt or run dir>")
    if int(cfg.eval.k) < 1:
        raise UserError(f"eval.k={cfg.eval.k}: the number of importance samples must be at least 1")
    ckpt = resolve_checkpoint(cfg.ckpt_path)
    device_name = cfg.eval.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    data = MNISTDataModule(cfg.data.data_dir, download=cfg.data.download)
    data.prepare_data()
    data.setup("test")
    model = load_model(ckpt, device)
    out = Path(cfg.paths.output_dir)
    writer = SummaryWriter(str(out / "tensorboard"))
    try:
        metrics = evaluate(
            model, data.test_x, data.test_y, out, cfg.eval.k, cfg.eval.batch_size, cfg.eval.chunk_rows,
            cfg.seed, cfg.eval.sample_seed, cfg.eval.scale, writer, extra={"checkpoint": str(ckpt.resolve())},
        )  # fmt: skip
    finally:
        writer.close()
    report(metrics, out)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)["test/iw_nll"]
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as err:
        reason = describe_disk_error(err, cfg.paths.output_dir)
        if reason is None:
            raise
        print(f"error: {reason}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
