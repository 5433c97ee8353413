"""A process of its own that sends a run's metric blocks to its MLflow store, so that training
never waits for the store or shares Python's lock with it.

Why a process: MLflow's SQLite store spends about 0.2 s of Python (SQLAlchemy's ORM) per 1,000
values, and a run sends about 1,400 a 3-second epoch. From a thread of the training process that
work holds the GIL the training loop needs: a tenth more per epoch, measured. A process at the lowest
priority takes it off the training's path; it fills the gaps the training leaves on the cores.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
from typing import Any

from vae_lightning.tracking.mlflow_store import first_line

# a reply: ("failed" | "synced", what stopped the sending or None, values not sent)
Reply = tuple[str, str | None, int]


class MetricSender:
    """Blocks of (key, value, timestamp, step) rows for one run, sent in order by a child process.

    Forked (it starts with the client the parent already made, and needs no import); it ends by
    itself within a second of its parent's death, however the parent died."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        context = multiprocessing.get_context("fork")
        self._requests: Any = context.Queue()
        self._replies: Any = context.Queue()
        self._process = context.Process(
            target=_serve, args=(tracking_uri, run_id, os.getpid(), self._requests, self._replies), daemon=True
        )
        self._process.start()

    def send(self, rows: list[tuple[str, float, int, int]]) -> None:
        self._requests.put(rows)

    def failures(self) -> list[Reply]:
        """What the sender has said so far, without waiting."""
        said = []
        with contextlib.suppress(queue.Empty):
            while True:
                said.append(self._replies.get_nowait())
        return said

    def sync(self, timeout: float = 600) -> list[Reply]:
        """Wait until every block sent so far is in the store (or failed); return what it said."""
        if not self._process.is_alive():
            return []
        self._requests.put("sync")
        said = []
        while True:
            try:
                reply = self._replies.get(timeout=timeout)
            except queue.Empty:
                return said
            said.append(reply)
            if reply[0] == "synced":
                return said

    def close(self) -> None:
        if self._process.is_alive():
            self._requests.put(None)
            self._process.join(timeout=30)


def _serve(tracking_uri: str, run_id: str, parent: int, requests: Any, replies: Any) -> None:
    """The child: send each block; after the first failure, count what is not sent."""
    with contextlib.suppress(OSError):
        os.nice(19)
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    engine = getattr(client._tracking_client.store, "engine", None)
    if engine is not None:  # the parent's pooled connections stay the parent's (SQLAlchemy: pooling with fork)
        engine.dispose(close=False)
    lost, unsent = None, 0
    while True:
        try:
            request = requests.get(timeout=1)
        except queue.Empty:
            if os.getppid() != parent:  # the training process is gone
                return
            continue
        if request is None:
            return
        if request == "sync":
            replies.put(("synced", lost, unsent))
            continue
        if lost:
            unsent += len(request)
            continue
        try:
            client.log_batch(run_id, metrics=[Metric(*row) for row in request])
        except Exception as err:
            lost, unsent = first_line(err), unsent + len(request)
            replies.put(("failed", lost, unsent))
