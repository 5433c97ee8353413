"""The evaluation of tested weights, as a callback of ``trainer.test``: the importance-weighted
bound, active units and the figures people look at. The test ELBO itself is the module's
``test_step``, so ``trainer.test`` gives every test number once, for ``train`` and ``eval`` alike."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torchvision.utils import save_image

from vae_lightning.errors import UserError
from vae_lightning.figures.plots import (
    interpolation_grid,
    labelled_grid,
    latent_scatter,
    manifold_grid,
    manifold_quantiles,
    parameter_and_mean_grid,
    reconstruction_grid,
    sample_grid,
    upscale,
)
from vae_lightning.model.bound import active_units, iw_log_likelihood
from vae_lightning.model.vae import VAE
from vae_lightning.names import ACTIVE_UNITS, BOUND_SECONDS, IW_NLL
from vae_lightning.outputs import replaced_atomically
from vae_lightning.training.callbacks import stop_requested
from vae_lightning.training.checkpoints import load_checkpoint

INTERPOLATION_PAIRS = [(0, 6), (1, 7), (2, 3), (3, 8), (4, 9), (5, 6), (7, 1), (9, 4)]


class BoundProgress:
    """A long bound's finished batches, kept in ``directory`` after each one: a run stopped or
    killed in its test pass continues its bound where it was (its continuation tests the same
    weights), and so does an eval run again, with the noise generator's state, so the result is the
    uninterrupted one's. The file is named by, and holds, a digest of what it is the progress of
    (the weights, the test images and the settings), so bounds of other weights sharing the
    directory keep their own; a file whose digest differs is ignored, and each is read by torch's
    safe loader only."""

    def __init__(self, directory: Path, model: VAE, test_x: Tensor, settings: tuple) -> None:
        digest = hashlib.sha256(repr(settings).encode())
        for tensor in [*model.state_dict().values(), test_x]:
            digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
        self.key = digest.hexdigest()
        self.path = directory / f"bound_progress_{self.key[:16]}.pt"

    def load(self) -> dict | None:
        """The saved batches' bounds and E[z|x] (CPU tensors), the generator's state and the seconds
        they took."""
        if not self.path.is_file():
            return None
        try:  # the checkpoints' reader: their zip checks first, then torch's safe unpickler
            saved = load_checkpoint(self.path)
        except UserError:  # one it refuses or cannot read: start over
            return None
        return saved if isinstance(saved, dict) and saved.get("key") == self.key else None

    def save(self, bounds: list[Tensor], mus: list[Tensor], generator: torch.Generator, seconds: float) -> None:
        state = {"key": self.key, "bounds": torch.cat(bounds).cpu(), "mus": torch.cat(mus).cpu(),
                 "generator": generator.get_state(), "seconds": seconds}  # fmt: skip
        with replaced_atomically(self.path) as partial:
            torch.save(state, partial)


class Evaluation(L.Callback):
    """When the test pass ends (on rank 0): ``test/iw_nll`` with ``k`` importance samples per
    test image and ``test/active_units``, logged beside the test ELBO; the figures written to
    ``output_dir`` and TensorBoard. ``k = 0`` turns it off."""

    def __init__(
        self,
        output_dir: str,
        k: int = 5000,
        batch_size: int = 100,
        chunk_rows: int = 32768,
        seed: int = 0,
        sample_seed: int = 2024,
        scale: int = 3,
        ten_samples: bool = False,
        progress_dir: str | None = None,
    ) -> None:
        self.out = Path(output_dir)
        self.progress_dir = Path(progress_dir) if progress_dir else self.out
        self.k, self.batch_size, self.chunk_rows = k, batch_size, chunk_rows
        self.seed, self.sample_seed, self.scale, self.ten_samples = seed, sample_seed, scale, ten_samples
        self.seconds = 0.0  # the last bound's

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.k < 1 or not trainer.is_global_zero:
            return
        model: VAE = pl_module.model
        test_x, test_y = trainer.datamodule.test_x.to(pl_module.device), trainer.datamodule.test_y
        iw_nll, mu = self.bound(model, test_x, trainer)
        pl_module.log(IW_NLL, iw_nll, rank_zero_only=True)
        # whole seconds: logged values become float32, in which 7.8 reads back as 7.800000190734863
        pl_module.log(BOUND_SECONDS, float(round(self.seconds)), rank_zero_only=True)
        pl_module.log(ACTIVE_UNITS, float(active_units(mu)), rank_zero_only=True)
        self.write_figures(model, test_x, test_y.cpu(), mu, trainer)

    def bound(self, model: VAE, test_x: Tensor, trainer: L.Trainer) -> tuple[float, Tensor]:
        """The mean importance-weighted bound's negative and every test image's E[z|x]; the seconds
        it took, those of the stopped passes it continued included, go in ``self.seconds``."""
        gen = torch.Generator(device=test_x.device).manual_seed(self.seed)
        start, next_report = time.perf_counter(), 0.1
        bounds, mus, done = [], [], 0
        settings = (self.k, self.seed, self.batch_size, self.chunk_rows)
        long = self.k >= 1000  # a bound of minutes: it says how far it is, and keeps its progress
        progress = BoundProgress(self.progress_dir, model, test_x, settings) if long else None
        saved = progress.load() if progress else None
        if saved:
            bounds, mus = [saved["bounds"].to(test_x.device)], [saved["mus"].to(test_x.device)]
            done = len(saved["bounds"])
            gen.set_state(saved["generator"])
            before = float(saved.get("seconds", 0.0))  # (files from before it kept them: 0)
            start -= before  # the clock counts the stopped passes' seconds too
            print(f"  importance-weighted bound, k={self.k}: continued after {done} images, {before:.0f} s", flush=True)
            next_report = math.floor(done / len(test_x) * 10 + 1) / 10
        for xb in test_x[done:].split(self.batch_size):
            if stop_requested(trainer):  # checked between test batches, not in this long hook
                raise SIGTERMException
            bounds.append(iw_log_likelihood(model, xb, self.k, self.chunk_rows, gen))
            mus.append(model.encode(xb.to(model.dtype))[0].float())
            done += len(xb)
            if progress:
                progress.save(bounds, mus, gen, time.perf_counter() - start)
            if long and done / len(test_x) >= next_report:
                if test_x.is_cuda:  # the clock must see the device's work, not its queue
                    torch.cuda.synchronize(test_x.device)
                print(f"  importance-weighted bound, k={self.k}: {done}/{len(test_x)} images, "
                      f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
                next_report += 0.1
        iw_nll = -torch.cat(bounds).mean().item()  # (waits for the device's work)
        self.seconds = time.perf_counter() - start
        if progress:
            progress.path.unlink(missing_ok=True)
        return iw_nll, torch.cat(mus)

    def write_figures(self, model: VAE, test_x: Tensor, labels: Tensor, mu: Tensor, trainer: L.Trainer) -> None:
        first, second = _first_of_each_class(labels, 0), _first_of_each_class(labels, 1)
        starts, ends = ([first[pair[i]] for pair in INTERPOLATION_PAIRS] for i in (0, 1))
        class_names = trainer.datamodule.class_names
        images = {
            "reconstructions": reconstruction_grid(model, test_x[first + second]),
            "interpolations": interpolation_grid(model, test_x[starts], test_x[ends]),
            "samples_100": sample_grid(model, 100, 10, self.sample_seed),
        }
        if self.ten_samples:  # a training run has them from SampleGrid already
            images["samples"] = sample_grid(model, 10, 10, self.sample_seed)
        if model.latent_dim == 2:
            images["manifold"] = manifold_grid(model)
        if model.likelihood.lambda_differs_from_mean:  # its mean can look washed out where its lambda does not
            images["lambda_and_mean"] = parameter_and_mean_grid(model, test_x[first], self.sample_seed)
        labelled = figure_labels(class_names, INTERPOLATION_PAIRS)
        for name, grid in images.items():
            with replaced_atomically(self.out / f"{name}.png") as partial:
                if name in labelled:
                    labelled_grid(grid, self.scale, **labelled[name]).savefig(partial, format="png")
                else:
                    save_image(upscale(grid, self.scale), partial, format="png")
        scatter = latent_scatter(mu, labels, class_names, trainer.datamodule.label_name)
        with replaced_atomically(self.out / "latent_scatter.png") as partial:
            scatter.savefig(partial, dpi=110, format="png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for name, grid in images.items():
                    logger.experiment.add_image(f"eval/{name}", grid, trainer.global_step)
                logger.experiment.add_figure("eval/latent_scatter", scatter, trainer.global_step)
                # the projector: every test image's E[z|x], with its label and its picture
                side = math.isqrt(model.input_dim)
                logger.experiment.add_embedding(
                    mu.float().cpu(), metadata=[class_names[label] for label in labels.tolist()],
                    label_img=test_x.float().cpu().view(-1, 1, side, side), global_step=trainer.global_step,
                    tag="test_mean_z",
                )  # fmt: skip


def figure_labels(class_names: list[str], pairs: list[tuple[int, int]]) -> dict[str, dict]:
    """What labelled_grid writes beside the rows and under the columns of each figure."""
    quantiles = [f"{q:.2f}" for q in manifold_quantiles().tolist()]
    return {
        "reconstructions": dict(
            title="Test images, each above its reconstruction: the decoder's mean at E[z|x]",
            row_labels=["test image", "reconstruction"] * 2, column_labels=class_names,
        ),
        "interpolations": dict(
            title="Decoded points on the line from one test image's E[z|x] to another's",
            row_labels=[f"{class_names[a]} → {class_names[b]}" for a, b in pairs],
            column_labels=[f"{t:.2g}" for t in torch.linspace(0, 1, 10).tolist()],
            bottom_title="t: decoded at (1 − t)·E[z|first] + t·E[z|second]",
        ),
        "lambda_and_mean": dict(
            title="Continuous Bernoulli: reconstructions and prior draws as the decoder's λ and as the mean",
            row_labels=["test image", "recon. λ", "recon. mean", "prior draw λ", "prior draw mean"],
            column_labels=class_names,
        ),
        "manifold": dict(
            title="The 2-D latent space decoded on a grid of Gaussian quantiles (5 % to 95 %)",
            row_labels=quantiles[::-1], column_labels=quantiles, left_title="z[1]", bottom_title="z[0]",
        ),
    }  # fmt: skip


def _first_of_each_class(labels: Tensor, occurrence: int) -> list[int]:
    return [int((labels == c).nonzero()[occurrence]) for c in range(10)]
