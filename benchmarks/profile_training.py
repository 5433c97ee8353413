"""Where a training epoch of the project's path (b) goes: cProfile over one epoch of the objects
``python -m vae_lightning.train`` builds (validation included), split into torch's kernels and
the Python around them, with the costliest Python functions.

    python benchmarks/profile_training.py [--threads 1] [--top 20] [overrides ...]

cProfile slows Python calls several-fold and kernels not at all, so read the shares as an upper
bound on what the Python costs; ``make bench`` gives the times.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch
from epoch_speed import project_epochs

from vae_lightning.data.datasets import default_data_dir, ensure_dataset


def is_torch_kernel(function: tuple[str, int, str]) -> bool:
    """A call into torch's C++ (an op, autograd's engine, the fused optimizer), by cProfile's name for it."""
    name = function[2]
    return name.startswith("<built-in method") and ("torch" in name or "_fused" in name) or "torch._C" in name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--top", type=int, default=20, help="Python functions to list, by their own time")
    parser.add_argument("overrides", nargs="*", help="config overrides for the project's path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = default_data_dir()
    ensure_dataset(data_dir, download=True)
    overrides = ["trainer.accelerator=cpu", "test=false", *args.overrides]
    project_epochs(data_dir, 1, overrides)  # warm: imports, first-touch allocations
    profiler = cProfile.Profile()
    profiler.runcall(project_epochs, data_dir, 1, overrides)
    stats = pstats.Stats(profiler).stats
    loop = next(v for k, v in stats.items() if k[2] == "run" and k[0].endswith("training_epoch_loop.py"))[3]
    kernels = sum(v[2] for k, v in stats.items() if is_torch_kernel(k))
    print(f"threads: {args.threads}; the epoch's loop (training and validation steps): {loop:.2f} s under cProfile")
    print(f"  torch kernels (everywhere, start-up and figures included): {kernels:.2f} s")
    print(f"  the rest of the loop, Python: at most {loop - kernels:.2f} s\n")
    print("costliest Python functions by their own time (s, calls):")
    python = [(v[2], v[1], k) for k, v in stats.items() if not is_torch_kernel(k)]
    for own, calls, (file, line, name) in sorted(python, reverse=True)[: args.top]:
        where = file.split("site-packages/")[-1] if "site-packages" in file else file.split("/")[-1]
        print(f"  {own:6.3f} {calls:7d}  {where}:{line}({name})")


if __name__ == "__main__":
    main()
