"""Two training runs side by side against the same two one after the other, on this machine.

    python benchmarks/side_by_side.py [--epochs 3] [--rounds 2] [--variants default threads=1] [-- extra overrides]

Each run is ``python -m vae_lightning.train trainer.max_epochs=<epochs> test=false eval.k=0`` into a
temporary dir. Per round: the pair one after the other (wall time of both), then the pair started
together (wall time until both end), with the project's defaults, with OpenMP's own wait policy
(its threads spin a while before they sleep: how torch runs when nothing sets it), and with
``threads=1`` (``--variants`` picks some: OpenMP's own policy side by side is slow for a big net).
Prints every round and the medians, with the machine's CPU and core count.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def start(epochs: int, extra: list[str], env: dict[str, str], out: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "vae_lightning.train", f"trainer.max_epochs={epochs}", "test=false", "eval.k=0",
            f"hydra.run.dir={out}", *extra]  # fmt: skip
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pair(epochs: int, extra: list[str], together: bool, env: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        if together:
            procs = [start(epochs, extra, env, f"{tmp}/{i}") for i in range(2)]
            codes = [p.wait() for p in procs]
        else:
            codes = [start(epochs, extra, env, f"{tmp}/{i}").wait() for i in range(2)]
        if any(codes):
            raise SystemExit(f"a run failed (exit codes {codes}); run it alone to see why")
        return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["default", "openmp", "threads=1"])
    parser.add_argument("extra", nargs="*")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}")
    # the project's default (a thread per core, OpenMP's threads sleeping while they wait), OpenMP's
    # own policy (an empty value: the project leaves a set variable alone, OpenMP ignores it), one thread
    unset = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    variants = {
        "default": ([], unset),
        "openmp": ([], {**unset, "OMP_WAIT_POLICY": ""}),  # OpenMP's own wait policy
        "threads=1": (["threads=1"], unset),
    }
    unknown = set(args.variants) - set(variants)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(variants)}")
    variants = {name: variants[name] for name in args.variants}
    times: dict[tuple[str, bool], list[float]] = {}
    for r in range(args.rounds):
        for name, (overrides, env) in variants.items():
            for together in (False, True):
                seconds = pair(args.epochs, [*overrides, *args.extra], together, env)
                times.setdefault((name, together), []).append(seconds)
                print(
                    f"round {r + 1}: {name}, {'side by side' if together else 'one after the other'}: {seconds:.1f} s"
                )
    for (name, together), values in times.items():
        how = "side by side" if together else "one after the other"
        print(f"median, {name}, {how}: {statistics.median(values):.1f} s over {len(values)} rounds")


if __name__ == "__main__":
    main()
