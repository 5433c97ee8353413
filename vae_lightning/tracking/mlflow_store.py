"""MLflow's side of a run: the tracking store (SQLite beside the runs unless the config names
another), the project's experiment, each run dir's MLflow run (named in its ``mlflow.json``), and a
sweep's parent run. Every failure to reach the store is one line (``UserError``)."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vae_lightning.errors import UserError
from vae_lightning.outputs import read_json, write_json

EXPERIMENT = "vae_lightning"
RUN_FILE = "mlflow.json"  # in a run dir (its MLflow run) and in a sweep dir (the parent run)
RUN_DIR_TAG = "vae_lightning.run_dir"
SWEEP_FILES = ("summary.md", "summary.csv", "summary_by_setting.csv")
T = TypeVar("T")


def store(log_dir: str | Path, tracking_uri: str | None, artifact_location: str | None) -> tuple[str, str | None]:
    """The tracking URI and artifact location: by default an SQLite file and a folder in the log
    dir (MLflow 3's own default store, where the project keeps its runs); a server chooses where its
    artifacts go unless told."""
    if tracking_uri:
        return tracking_uri, artifact_location
    log_dir = Path(log_dir).resolve()
    return f"sqlite:///{log_dir / 'mlflow.db'}", artifact_location or str(log_dir / "mlartifacts")


def bounded_and_quiet() -> None:
    # a server that is down answers after MLflow's retries: 7 by default, minutes of backoff for
    # each request; two are enough to ride out a blip without holding training up for long
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    for name in ("alembic", "mlflow"):  # the store's schema migrations say every step at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # each retry, at WARNING


def open_client(tracking_uri: str):
    bounded_and_quiet()
    from mlflow.tracking import MlflowClient

    return opened(tracking_uri, lambda: MlflowClient(tracking_uri))  # an SQLite store is opened here


def first_line(err: BaseException) -> str:
    """What went wrong, short: the OS's reason under an HTTP client's wrapping ("Connection
    refused"), else the error's first line."""
    text = str(err).strip()
    if errno := re.search(r"\[Errno -?\d+\] ([^\"')]+)", text):
        return errno.group(1).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def opened(tracking_uri: str, what: Callable[[], T]) -> T:
    """``what()``, with a store that cannot be reached, opened or written as one line."""
    try:
        return what()
    except Exception as err:
        raise UserError(
            f"the MLflow tracking store {tracking_uri} cannot be used: {first_line(err)}; start it, free it, "
            "or point logger.mlflow.tracking_uri at another (or use logger=tensorboard)"
        ) from err


def experiment_id(client, artifact_location: str | None) -> str:
    """The project's experiment, made on first use (by one of several jobs starting at once)."""
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None and found.lifecycle_stage != "deleted":
        return found.experiment_id
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=artifact_location)
    except Exception:  # another job made it first
        found = client.get_experiment_by_name(EXPERIMENT)
        if found is None:
            raise
        return found.experiment_id


def flat_config(cfg: DictConfig) -> dict[str, str]:
    """The composed config as MLflow params: ``model.latent_dim`` -> "20"."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)[:6000]  # MLflow's limit for a param's value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def recorded_run_id(directory: Path, tracking_uri: str) -> str | None:
    """The run id a dir's ``mlflow.json`` records for this store, if any."""
    data = read_json(directory / RUN_FILE)
    return data.get("run_id") if isinstance(data, dict) and data.get("tracking_uri") == tracking_uri else None


def run_for_dir(client, tracking_uri: str, directory: Path, experiment: str, tags: dict[str, str]) -> tuple[Any, bool]:
    """A run dir's (or sweep dir's) MLflow run: the one its ``mlflow.json`` records, running again,
    or a new one with ``tags``, recorded there; and whether it was the recorded one."""
    run_id = recorded_run_id(directory, tracking_uri)
    run = opened(tracking_uri, lambda: existing_run(client, run_id)) if run_id else None
    if run is not None:
        opened(tracking_uri, lambda: client.update_run(run.info.run_id, status="RUNNING"))
        return run, True
    run = opened(tracking_uri, lambda: client.create_run(experiment, tags=tags))
    write_json(directory / RUN_FILE, {"tracking_uri": tracking_uri, "run_id": run.info.run_id})
    return run, False


def existing_run(client, run_id: str):
    """The run a run dir's ``mlflow.json`` names, or None when the store no longer has it."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return run if run.info.lifecycle_stage == "active" else None


def last_steps(client, run) -> dict[str, int]:
    """The last step MLflow holds of each of the run's metrics."""
    return {key: max(m.step for m in client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics}


def sweep_parent(tracking_uri: str) -> str | None:
    """The parent run of the sweep this job belongs to (``SweepRun`` made it), if any."""
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return None
    return recorded_run_id(Path(HydraConfig.get().sweep.dir), tracking_uri)


def _sweep_store(config: DictConfig) -> tuple[str, str | None] | None:
    node = OmegaConf.select(config, "logger.mlflow")
    if node is None:
        return None
    return store(config.paths.log_dir, node.get("tracking_uri"), node.get("artifact_location"))


def open_sweep_run(config: DictConfig) -> None:
    """A sweep that logs to MLflow is one parent run (its dir's ``mlflow.json``), made in the
    launching process before its jobs start; each job's run is its child. A continued sweep
    keeps its parent."""
    if (where := _sweep_store(config)) is None:
        return
    uri, artifact_location = where
    sweep_dir = Path(config.hydra.sweep.dir).resolve()
    client = open_client(uri)
    experiment = opened(uri, lambda: experiment_id(client, artifact_location))
    tags = {"mlflow.runName": sweep_dir.name, RUN_DIR_TAG: str(sweep_dir)}
    run, continued = run_for_dir(client, uri, sweep_dir, experiment, tags)
    if not continued:
        overrides = " ".join(config.hydra.overrides.task)
        opened(uri, lambda: client.log_param(run.info.run_id, "overrides", overrides[:6000]))


def close_sweep_run(config: DictConfig, sweep_dir: Path, failed: bool) -> None:
    """Send the sweep's summary tables to its parent run and mark it finished (or failed)."""
    if (where := _sweep_store(config)) is None:
        return
    uri = where[0]
    if (parent := recorded_run_id(sweep_dir, uri)) is None:
        return
    client = open_client(uri)
    try:
        for name in SWEEP_FILES:
            if (sweep_dir / name).is_file():
                client.log_artifact(parent, str(sweep_dir / name))
        client.set_terminated(parent, "FAILED" if failed else "FINISHED")
    except Exception as err:
        print(f"warning: the sweep's summary was not sent to MLflow ({first_line(err)})", file=sys.stderr)
