"""Main-thread time of TrainingHistory's per-step logging into TensorBoard, by the writer's queue
size: 100 steps of three scalars, as one flush sends them, for SummaryWriter's default
``max_queue=10`` and for the project's 1000, interleaved, medians.

    python benchmarks/logger_queue.py
"""

from __future__ import annotations

import statistics
import tempfile
import time

from lightning.pytorch.loggers import TensorBoardLogger

QUEUES = (10, 1000)


def one_flush(max_queue: int, steps: int = 100) -> float:
    """Seconds the calling thread spends sending ``steps`` steps of BCE, KL and loss."""
    with tempfile.TemporaryDirectory() as out:
        logger = TensorBoardLogger(out, name="", version="", max_queue=max_queue)
        _ = logger.experiment  # the writer and its thread exist before the clock starts
        start = time.perf_counter()
        for step in range(steps):
            logger.log_metrics({"train/rec_step": 70.0 + step, "train/kl_step": 25.0, "train/loss_step": 95.0}, step)
        seconds = time.perf_counter() - start
        logger.finalize("success")
    return seconds


def main() -> None:
    times: dict[int, list[float]] = {q: [] for q in QUEUES}
    for _ in range(15):
        for q in QUEUES:
            times[q].append(one_flush(q))
    for q, values in times.items():
        print(f"max_queue={q}: {statistics.median(values) * 1e3:.1f} ms per 100 steps (median of {len(values)})")


if __name__ == "__main__":
    main()
