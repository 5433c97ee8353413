"""Every metric name and table column, defined once and used by every writer and reader."""

from __future__ import annotations

STAGES = ("train", "val", "test")
# per image, in nats: rec = -log p(x|z) under the model's likelihood (the BCE for the Bernoulli, as
# runs before likelihoods were parts called it: "bce"), kl = KL(q(z|x) || p(z)); loss = rec + kl
TERMS = ("loss", "rec", "kl")
RENAMED_TERMS = {"bce": "rec"}


def current_name(key: str) -> str:
    """A metric or column name as this version calls it: ``train/bce`` of an older run is ``train/rec``."""
    stage, sep, term = key.rpartition("/")
    for old, new in RENAMED_TERMS.items():
        if term == old or term.startswith(f"{old}_"):
            return f"{stage}{sep}{new}{term[len(old) :]}"
    return key


def metric(stage: str, term: str) -> str:
    return f"{stage}/{term}"


def step_metric(term: str) -> str:
    """Every optimizer step: the batch's per-image value of an objective's term (TensorBoard, MLflow)."""
    return f"train/{term}_step"


def epoch_metrics(terms: tuple[str, ...] = TERMS) -> tuple[str, ...]:
    """Every epoch's train and val value of each of an objective's terms: epochs.csv's columns after "epoch"."""
    return tuple(metric(stage, term) for stage in ("train", "val") for term in terms)


# the terms every objective has (objectives.BOUND_TERMS), in the order the step records keep them
STEP_ORDER = ("rec", "kl", "loss")
EPOCH_METRICS = epoch_metrics()
EPOCH_COLUMNS = ("epoch", *EPOCH_METRICS)
# the tested weights: the test ELBO (trainer.test) and the importance-weighted bound
TEST_METRICS = tuple(metric("test", term) for term in TERMS)
IW_NLL = "test/iw_nll"
ACTIVE_UNITS = "test/active_units"
# what a finished run reports everywhere: metrics.json, the printed report, TensorBoard's HPARAMS
# view and the sweep summary
FINAL_METRICS = (*EPOCH_METRICS, *TEST_METRICS, IW_NLL, ACTIVE_UNITS)
# seconds: the training's and the bound's over every sitting of a continued run (Lightning's Timer,
# whose state the checkpoints carry; the bound's kept batches), and the whole of the sitting that
# finished the run (test pass and report too)
TRAIN_SECONDS = "train_seconds"
BOUND_SECONDS = "bound_seconds"
WALL_SECONDS = "wall_seconds"
TIMES = (TRAIN_SECONDS, BOUND_SECONDS, WALL_SECONDS)
SUMMARY_COLUMNS = ("job", "overrides", "status", "epochs", *FINAL_METRICS, *TIMES)
# a multirun over seeds: what its over-seeds table gives the mean and std of, per setting
SEED_METRICS = (*FINAL_METRICS, *TIMES)
