"""MLflow as a tracker (``logger=mlflow``): a run dir is one MLflow run, a sweep one parent run with
a child run per job (``mlflow_store``), and a continued run the same MLflow run, its step history
without holes or repeats."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from vae_lightning.errors import UserError
from vae_lightning.names import step_metric
from vae_lightning.tracking.mlflow_sender import MetricSender
from vae_lightning.tracking.mlflow_store import (
    EXPERIMENT,
    RUN_DIR_TAG,
    bounded_and_quiet,
    experiment_id,
    first_line,
    flat_config,
    last_steps,
    opened,
    run_for_dir,
    store,
    sweep_parent,
)
from vae_lightning.training.callbacks import TrainingHistory
from vae_lightning.workarounds import MLflowLoggerState

BATCH = 1000  # MLflow's limit of metrics in one log_batch request
# what a finished run sends, beside the figures (*.png)
RUN_FILES = ("report.html", "metrics.json", "epochs.csv")
UI = "http://127.0.0.1:5000"  # mlflow server's own address


class MLflow(MLFlowLogger):
    """Lightning's MLFlowLogger, with what a run of this project needs around it:

    - the run is opened when the logger is built, before training, so a store that is down,
      locked or unwritable is one line before anything starts (Lightning opens it at the first log);
    - metrics go in blocks of up to 1000 (MLflow's limit), sent when Lightning saves its loggers (after
      each epoch's logs) and when the block is full: TrainingHistory gives every step, and one request per
      step is the known trap of Lightning's logger (a request per log call);
    - a continued run (its dir's ``mlflow.json``) is the same MLflow run, and steps MLflow already has are
      not sent again (a continuation repeats the steps after its checkpoint, with the same values);
    - a store lost mid-run is one warning; training goes on, and the end of the run says what was not sent.
    """

    def __init__(
        self,
        run_dir: str,
        log_dir: str,
        tracking_uri: str | None = None,
        artifact_location: str | None = None,
        log_model: bool | str = False,
        metrics_per_request: int = BATCH,
    ) -> None:
        if importlib.util.find_spec("mlflow") is None:
            raise UserError("logger=mlflow needs MLflow: pip install 'vae_lightning[mlflow]' (or logger=tensorboard)")
        tracking_uri, artifact_location = store(log_dir, tracking_uri, artifact_location)
        self.run_dir = Path(run_dir).resolve()
        bounded_and_quiet()
        opened(  # Lightning's logger opens an SQLite store here
            tracking_uri,
            lambda: super(MLflow, self).__init__(
                experiment_name=EXPERIMENT,
                run_name=run_name(self.run_dir, Path(log_dir)),
                tracking_uri=tracking_uri,
                artifact_location=artifact_location,
                log_model=log_model,
            ),
        )
        self.state = MLflowLoggerState(self)  # Lightning's private attributes, read and set there only
        self._pending: list = []
        self.metrics_per_request = min(metrics_per_request, BATCH)
        # metric blocks go out from a process of their own (mlflow_sender), the other requests (params,
        # artifacts, the run's status) from one thread, in order: training waits for neither
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow")
        self._sent: list[Future] = []
        self._sent_up_to: dict[str, int] = {}  # a continued run: the last step MLflow has of each metric
        self.lost: str | None = None  # what stopped the logging, once the store stopped answering
        self.unsent = 0  # metric values

    @rank_zero_only
    def open(self, cfg: DictConfig) -> None:
        """Find or make this run dir's MLflow run and log the composed config as its params."""
        state = self.state
        uri, client = state.tracking_uri, state.client
        state.experiment_id = opened(uri, lambda: experiment_id(client, state.artifact_location))
        tags = {"mlflow.runName": state.run_name, RUN_DIR_TAG: str(self.run_dir)}
        if parent := sweep_parent(uri):
            tags["mlflow.parentRunId"] = parent
        run, continued = run_for_dir(client, uri, self.run_dir, state.experiment_id, tags)
        if continued:
            self._sent_up_to = opened(uri, lambda: last_steps(client, run))
        state.adopt(run.info.run_id)
        self._metrics = MetricSender(uri, run.info.run_id)
        self._log_params(cfg, run.data.params)

    def _log_params(self, cfg: DictConfig, earlier: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        params = flat_config(cfg)
        # MLflow never changes a param: what a continuation changed (more epochs) is a tag
        new = [Param(k, v) for k, v in params.items() if k not in earlier]
        changed = [RunTag(f"continued.{k}", v) for k, v in params.items() if k in earlier and earlier[k] != v]
        for start in range(0, max(len(new), len(changed)), 100):
            self._send(
                lambda start=start: self.state.client.log_batch(
                    self.state.run_id, params=new[start : start + 100], tags=changed[start : start + 100]
                )
            )

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        """The params are the composed config (``open``); Lightning's copy of the module's is not needed."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = step or 0
        now = _now_ms()
        for key, value in metrics.items():
            # Lightning's "epoch" is dropped as in tracking.TensorBoard (a straight line)
            if key != "epoch" and step > self._sent_up_to.get(key, -1) and not isinstance(value, str):
                self._pending.append((key, float(value), now, step))
        if len(self._pending) >= self.metrics_per_request:
            self.save()

    @rank_zero_only
    def save(self) -> None:
        if not self.state.opened:
            return
        while self._pending:
            block, self._pending = self._pending[:BATCH], self._pending[BATCH:]
            self._metrics.send(block)
        self._heard(self._metrics.failures())

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self.state.opened:
            return
        self.save()
        self._send(self.state.log_checkpoints)  # log_model=True: the checkpoints when training ends
        state = "FINISHED" if status in ("success", "finished") else "FAILED"
        self._send(lambda: self.state.client.set_terminated(self.state.run_id, state))
        self.wait()

    def wait(self) -> None:
        """Until every request sent so far has been answered (or failed)."""
        self._heard(self._metrics.sync())
        for request in self._sent:
            request.exception()
        self._sent = []

    @rank_zero_only
    def backfill(self, checkpoint: dict[str, Any]) -> None:
        """A continued run's history up to its checkpoint (the run's own record, ``TrainingHistory``),
        for the steps and epochs its MLflow run lacks: those a kill caught on their way to the store,
        or all of them when the run is continued with MLflow for the first time."""
        state = next((v for k, v in checkpoint.get("callbacks", {}).items() if "TrainingHistory" in k), None)
        if not state:
            return
        history = TrainingHistory(output_dir=str(self.run_dir))
        history.load_state_dict(state)
        for step, row in zip(history.steps.tolist(), history.step_values.tolist(), strict=True):
            self.log_metrics(
                {step_metric(term): value for term, value in zip(history.step_terms, row, strict=True)}, step
            )
        steps, epochs = history.steps.tolist(), history.epochs
        if epochs and len(steps) % len(epochs) == 0:  # each epoch's metrics were logged at its last step
            per_epoch = len(steps) // len(epochs)
            for row in epochs:
                values = {key: value for key, value in row.items() if key != "epoch"}
                self.log_metrics(values, steps[int(row["epoch"]) * per_epoch - 1])
        self.save()

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._send(lambda: MLFlowLogger.after_save_checkpoint(self, checkpoint_callback))

    @rank_zero_only
    def log_outputs(self, files: list[Path]) -> None:
        """Send a finished run's files (figures, report, metrics) as the run's artifacts; then say
        what never reached the store, if it was lost."""
        for path in files:
            self._send(lambda path=path: self.state.client.log_artifact(self.state.run_id, str(path)))
        self.wait()
        self._metrics.close()
        if self.lost:
            print(
                f"warning: MLflow has this run only up to where its store stopped answering ({self.lost}); "
                f"not sent: {self.unsent} metric values and the run's files. Everything is in {self.run_dir}",
                file=sys.stderr,
            )

    def where(self) -> str:
        """Where a user sees this run: the MLflow UI's page of it."""
        uri = self.state.tracking_uri
        page = f"#/experiments/{self.state.experiment_id}/runs/{self.state.run_id}"
        if uri.startswith("sqlite:"):
            server = f"make mlflow-ui (or mlflow server --backend-store-uri {uri})"
            return f"MLflow: {server}, then {UI}/{page}"
        return f"MLflow: {uri.rstrip('/')}/{page}"

    def _heard(self, replies: list) -> None:
        """What the metric sender said: the store it lost, and how many values it did not send."""
        for _, lost, unsent in replies:
            if lost:
                self._lose(lost)
            self.unsent = max(self.unsent, unsent)

    def _lose(self, reason: str) -> None:
        if self.lost:
            return
        self.lost = reason
        print(
            f"warning: the MLflow tracking store {self.state.tracking_uri} stopped answering ({reason}); "
            "training goes on, the rest of this run is not sent to MLflow",
            file=sys.stderr,
        )

    def _send(self, request: Callable[[], Any]) -> None:
        """One request to the store, queued for the sending thread. The first failure is one warning
        and the end of MLflow logging for this run: the run goes on, and its own files keep everything."""
        self._sent = [sent for sent in self._sent if not sent.done()]
        self._sent.append(self._sender.submit(self._request, request))

    def _request(self, request: Callable[[], Any]) -> None:  # in the sending thread
        if self.lost:
            return
        try:
            request()
        except Exception as err:
            self._lose(first_line(err))


def _now_ms() -> int:
    return int(time.time() * 1000)


def run_name(run_dir: Path, log_dir: Path) -> str:
    """A run dir's name in MLflow: its path under the log dir (``train/runs/<time>``); a sweep job's
    is its sweep's and what it varies, as TensorBoard names it."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        job = HydraConfig.get()
        return f"{Path(job.sweep.dir).name}/{job.job.override_dirname or f'job_{job.job.num}'}"
    try:
        return str(run_dir.relative_to(log_dir.resolve()))
    except ValueError:
        return run_dir.name


def mlflow_loggers(loggers: list) -> list[MLflow]:
    return [logger for logger in loggers if isinstance(logger, MLflow)]
