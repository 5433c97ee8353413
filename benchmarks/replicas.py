"""N seeds of the reference net trained as one model (``hydra/launcher=replicas``) against the same
N jobs one after the other (Hydra's basic launcher) and side by side (``hydra/launcher=joblib``,
the cores split between the jobs it runs at once), for N = 1, 2, 4, 8, on real MNIST:

    python benchmarks/replicas.py [--epochs 3] [--rounds 2] [--n 1 2 4 8]

Each candidate is one sweep command, ``python -m vae_lightning.train -m seed=0,..,N-1
trainer.max_epochs=<epochs> test=false eval.k=0`` into a temporary dir, timed whole (start-up,
training, validation, reports). Candidates are interleaved round by round and medians reported.
Also printed: the replicas' training seconds per replica-epoch (their ``train_seconds`` over
epochs and N, validation included) against the GEMM floor (c) of ``epoch_speed.py``, measured in
the same run, with the machine's CPU and flags.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from epoch_speed import gemm_floor, machine  # noqa: E402

LAUNCHERS = {"one after the other": [], "side by side": ["hydra/launcher=joblib"],
             "replicas": ["hydra/launcher=replicas"]}  # fmt: skip


def sweep(n: int, epochs: int, launcher: list[str]) -> tuple[float, float]:
    """(wall seconds of the sweep command, its first job's train_seconds)."""
    with tempfile.TemporaryDirectory() as out:
        args = [sys.executable, "-m", "vae_lightning.train", "-m", f"seed={','.join(map(str, range(n)))}",
                f"trainer.max_epochs={epochs}", "test=false", "eval.k=0", f"hydra.sweep.dir={out}",
                f"paths.log_dir={out}", *launcher]  # fmt: skip
        began = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True)
        wall = time.perf_counter() - began
        if done.returncode:
            raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return wall, json.loads((Path(out) / "0" / "metrics.json").read_text())["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    if not os.environ.get("VAE_DATA_DIR"):
        print("note: VAE_DATA_DIR is not set; MNIST is read from (or downloaded to) data/", file=sys.stderr)
    device = torch.device("cpu")
    print(json.dumps(machine(device)))
    walls: dict[tuple[int, str], list[float]] = {}
    per_replica_epoch: dict[int, list[float]] = {}
    floors = []
    for round_ in range(args.rounds):
        floors.append(gemm_floor(device)["s_per_epoch"])
        for n in args.n:
            for name, launcher in LAUNCHERS.items():
                wall, train_seconds = sweep(n, args.epochs, launcher)
                walls.setdefault((n, name), []).append(wall)
                if name == "replicas":
                    per_replica_epoch.setdefault(n, []).append(train_seconds / args.epochs / n)
                print(f"round {round_ + 1}  N={n}  {name}: {wall:.1f} s", flush=True)
    floor = statistics.median(floors)
    print(f"\nmedians over {args.rounds} rounds, {args.epochs} epochs a job; GEMM floor (c) {floor:.2f} s an epoch\n")
    print("| N | one after the other | side by side | replicas | replicas / one after the other | "
          "replicas / side by side | replicas' s per replica-epoch | / GEMM floor (c) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for n in args.n:
        seq, side, rep = (statistics.median(walls[(n, name)]) for name in LAUNCHERS)
        epoch = statistics.median(per_replica_epoch[n])
        print(f"| {n} | {seq:.1f} s | {side:.1f} s | {rep:.1f} s | {rep / seq:.2f} | {rep / side:.2f} | "
              f"{epoch:.2f} s | {epoch / floor:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
