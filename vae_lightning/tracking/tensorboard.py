"""TensorBoard as this project writes it: the curves first, nothing in front of them."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from lightning.pytorch.loggers import TensorBoardLogger

from vae_lightning.names import metric

# the charts a user opens TensorBoard for, pinned at the top of its first view (Time Series),
# each term's train curve beside its val curve
CURVES = tuple(metric(stage, term) for term in ("rec", "kl", "loss") for stage in ("train", "val"))


class TensorBoard(TensorBoardLogger):
    """Lightning's TensorBoardLogger without the ``epoch`` scalar Lightning adds to every
    epoch-level log (Lightning-AI/pytorch-lightning#3759: "what does the epoch chart show?"). It
    was the first chart TensorBoard showed, a straight line, with the curves below it."""

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics({name: value for name, value in metrics.items() if name != "epoch"}, step)


def curves_url(port: int = 6006) -> str:
    """TensorBoard's address with ``CURVES`` pinned: its Time Series view reads pinned cards from
    the ``pinnedCards`` query (the link a user gets from TensorBoard's own pin button), and no
    setting in the event files can pin a chart."""
    cards = json.dumps([{"plugin": "scalars", "tag": tag} for tag in CURVES], separators=(",", ":"))
    return f"http://localhost:{port}/?pinnedCards={quote(cards, safe='/:,[]{}')}#timeseries"
