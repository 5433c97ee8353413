"""What a finished (or failed) run records: ``metrics.json``, TensorBoard's HPARAMS view, the
printed report, and the reason a run stopped."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vae_lightning.model.likelihoods import LIKELIHOODS
from vae_lightning.model.nets import net_label
from vae_lightning.names import ACTIVE_UNITS, FINAL_METRICS, IW_NLL, WALL_SECONDS
from vae_lightning.outputs import WRITER_LOCK, read_json, write_json
from vae_lightning.tracking.mlflow_logger import RUN_FILES, mlflow_loggers
from vae_lightning.tracking.tensorboard import curves_url

log = logging.getLogger(__name__)

CONTINUOUS_NOTE = (
    "the pixels here are continuous in [0, 1] (data.binarize=none), so test/iw_nll is the Bernoulli "
    "'likelihood' of the reference notebook's loss (nats per image), not the NLL of binarized MNIST that "
    "papers report"
)
BINARIZED_NOTE = (
    "test/iw_nll bounds the negative log-likelihood of the binarized test set (nats per image), the number "
    "papers report for binarized MNIST"
)


DENSITY_NOTE = (
    "test/iw_nll bounds the negative log-density of the test images under the {likelihood}, a density on "
    "{support} (nats per image, so it can be negative): comparable with other densities of the same pixels, not "
    "with a Bernoulli's number nor with the NLL of binarized MNIST that papers report"
)


def likelihood_note(metrics: dict[str, Any], likelihood: str) -> str:
    """What ``test/iw_nll`` means under the run's protocol (``binarize`` in ``metrics``) and likelihood."""
    support = LIKELIHOODS.get(likelihood).density_support
    if support is not None:
        return DENSITY_NOTE.format(likelihood=likelihood.replace("_", " "), support=support)
    return CONTINUOUS_NOTE if metrics.get("binarize", "none") == "none" else BINARIZED_NOTE


# what the end of a run lists, the report first; each with what it is
OUTPUT_FILES = {
    "report.html": "the run on one page: settings, metrics, figures, the latent explorer (open it in a browser)",
    "metrics.json": "the final numbers",
    "epochs.csv": "one row per epoch",
    "loss_curves.png": "reconstruction loss and KL per step and per epoch",
    "samples.png": "10 decoded draws from the prior",
    "samples_100.png": "100 of them",
    "reconstructions.png": "test digits above their reconstructions",
    "interpolations.png": "decoded points between pairs of test digits",
    "latent_scatter.png": "the test set's E[z|x]",
    "manifold.png": "the 2-D latent space decoded on a grid",
    "lambda_and_mean.png": "a continuous Bernoulli decoder's lambda beside its mean",
    "checkpoints": "the best epoch's weights and the last epoch's (continue with ckpt_path=<this run dir>)",
    "tensorboard": "curves and images: tensorboard --logdir <this run dir>, then the address below",
    "train.log": "everything printed, with times",
}


def hyperparameters(cfg: DictConfig) -> dict[str, float | int | str]:
    """The settings a sweep varies, flat, for TensorBoard's HPARAMS view: the model's every plain
    setting (an objective's own included), its net in a few words, and the run's data and trainer."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    plain = {k: v for k, v in model.items() if not k.startswith("_") and isinstance(v, bool | int | float | str)}
    return {
        **plain,
        "net": net_label(cfg.model.net),
        "dataset": cfg.data.dataset,
        "binarize": cfg.data.binarize,
        "batch_size": cfg.data.batch_size,
        "max_epochs": cfg.trainer.max_epochs,
        "precision": str(cfg.trainer.precision),
        "seed": cfg.seed,
    }


def run_finished(metrics: dict[str, Any]) -> bool:
    """Whether a run's ``metrics.json`` is that of a run that went to its end (its test pass and
    report included): ``wall_seconds`` is written last, and a failure leaves a ``status``. A run
    stopped in its test pass has its training metrics but is not finished."""
    return "status" not in metrics and WALL_SECONDS in metrics


def record(cfg: DictConfig, metrics: dict[str, Any], loggers: list) -> None:
    """Write ``metrics.json`` and the HPARAMS view of a finished run."""
    out = Path(cfg.paths.output_dir)
    if IW_NLL in metrics:
        metrics["note"] = likelihood_note(metrics, cfg.model.likelihood)
    write_json(out / "metrics.json", metrics)
    for tb in (lg for lg in loggers if isinstance(lg, TensorBoardLogger)):
        tb.log_hyperparams(hyperparameters(cfg), {f"hp/{k}": metrics[k] for k in FINAL_METRICS if k in metrics})


def send_outputs(out: Path, loggers: list) -> None:
    """A finished run's report, numbers and figures, as artifacts of its MLflow run (logger=mlflow)."""
    files = [out / name for name in RUN_FILES if (out / name).is_file()] + sorted(out.glob("*.png"))
    for tracker in mlflow_loggers(loggers):
        tracker.log_outputs(files)


def announce(out: Path, metrics: dict[str, Any], loggers: list) -> None:
    """Print (and log in train.log) every output of the finished run, the report first, where
    its trackers show it, and its numbers."""
    lines = [f"Outputs in {out}"]
    lines += [f"  {out / name}  ({what})" for name, what in OUTPUT_FILES.items() if (out / name).exists()]
    if (out / "tensorboard").exists():
        lines.append(f"TensorBoard with the train and val curves pinned first: {curves_url()}")
    lines += [tracker.where() for tracker in mlflow_loggers(loggers)]
    log.info("\n".join(lines + report_lines(metrics)))


def report_lines(metrics: dict[str, Any]) -> list[str]:
    """The final per-image metrics as printed, from the same dict as ``metrics.json``."""
    lines = ["Final per-image metrics:"]
    lines += [f"  {key:<17} {metrics[key]:9.3f}" for key in FINAL_METRICS[:-1] if isinstance(metrics.get(key), float)]
    if ACTIVE_UNITS in metrics:
        units, latent_dim = metrics[ACTIVE_UNITS], metrics.get("latent_dim", "?")
        lines.append(f"  active units {units:.0f} of {latent_dim} (k = {metrics.get('k')})")
    return lines


def record_failure(out: Path, reason: str) -> None:
    """Leave the reason in the run dir, where a sweep summary finds it, beside whatever the run had
    finished, and in train.log (the console already has it on stderr)."""
    if rank_zero_only.rank != 0:  # the other processes of a DDP run say it on stderr only
        return
    record_ = log.makeRecord(log.name, logging.ERROR, __file__, 0, f"error: {reason}", None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record_)
    try:
        write_json(out / "metrics.json", {**(read_json(out / "metrics.json") or {}), "status": f"failed: {reason}"})
    except OSError:
        pass  # the disk that stopped the run may not take this either; the message is printed


def refuse(reason: str, out: str | Path) -> NoReturn:
    """End a command (eval, report, export) that could not do its work: one line, its own dir
    removed when nothing but Hydra's files and the log are in it, exit 1."""
    print(f"error: {reason}", file=sys.stderr)
    discard_if_unstarted(Path(out))
    raise SystemExit(1)


def discard_if_unstarted(out: Path) -> bool:
    """Remove a single run's dir that holds nothing but what Hydra and the log wrote (the run failed
    before training started: no data, a bad setting), so that ``logs/`` keeps runs, not failures;
    the console said why. Anything else in it keeps it. True if it was removed."""
    if rank_zero_only.rank != 0:
        return False
    ours = {out / ".hydra" / name for name in ("config.yaml", "hydra.yaml", "overrides.yaml")}
    ours |= {out / f"{entry}.log" for entry in ("train", "eval", "report", "export")}
    ours |= {out / "metrics.json", out / WRITER_LOCK}
    if any(path.is_file() and path not in ours or path.is_symlink() for path in out.rglob("*")):
        return False
    try:
        for path in ours:
            path.unlink(missing_ok=True)
        (out / ".hydra").rmdir()
        out.rmdir()
    except OSError:
        return False
    return True
