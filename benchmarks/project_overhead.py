"""Where the project's path (b) spends its time beyond Lightning's floor (g) (``make bench``):

1. each callback's hooks, in ms per epoch: Lightning's own dispatch to the callback (a call per
   hook per callback, even for hooks it does not override) and the callback's work, over
   ``--epochs`` epochs of the objects ``python -m vae_lightning.train`` builds;
2. validation on the 10k test images, per epoch;
3. the LightningModule's training step against the bare loop's step (the same model, batch and
   optimizer, in this process, interleaved), in us per step: the epoch metrics and the step values
   that ``TrainingHistory`` sends to TensorBoard.

    python benchmarks/project_overhead.py [--epochs 4] [--rounds 9]

Hand-written because Lightning's profilers time each hook under a name, not per callback and
without the dispatch around it.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from epoch_speed import bare_loss, machine, project_epochs
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping
from lightning.pytorch.trainer import call

from vae_lightning.data.datasets import default_data_dir, ensure_dataset
from vae_lightning.training.module import VAEModule
from vae_lightning.workarounds import skip_nvml_probe_without_gpu

PER_BATCH_HOOKS = ("batch", "backward", "optimizer_step", "zero_grad")
STEPS = 469  # optimizer steps per epoch: 60,000 images in batches of 128


def timed_callback_hooks(seconds: collections.Counter):
    """Lightning's ``_call_callback_hooks``, the same calls in the same order, each timed per callback."""

    def run(trainer, hook_name, *args, monitoring_callbacks=None, **kwargs) -> None:
        callbacks = trainer.callbacks
        if monitoring_callbacks is not None:
            monitoring = [isinstance(cb, (EarlyStopping, Checkpoint)) for cb in callbacks]
            callbacks = [cb for cb, m in zip(callbacks, monitoring, strict=True) if m == monitoring_callbacks]
        module = trainer.lightning_module
        previous, module._current_fx_name = module._current_fx_name, hook_name
        kind = "per batch" if any(h in hook_name for h in PER_BATCH_HOOKS) else "per epoch or run"
        for callback in callbacks:
            start = time.perf_counter()
            with trainer.profiler.profile(f"[Callback]{callback.state_key}.{hook_name}"):
                getattr(callback, hook_name)(trainer, module, *args, **kwargs)
            name = type(callback).__name__ + (f"({callback.monitor})" if isinstance(callback, Checkpoint) else "")
            seconds[(name, kind if hook_name != "on_train_end" else "on_train_end, once")] += (
                time.perf_counter() - start
            )
        module._current_fx_name = previous

    return run


def step_costs(rounds: int, steps: int = 300) -> tuple[float, float]:
    """us per optimizer step of the module's training step and of the bare loop's, interleaved."""
    torch.manual_seed(0)
    module = VAEModule()
    module._logged_this_epoch = {("train", t) for t in ("rec", "kl", "loss")}  # self.log needs a trainer
    x = torch.rand(128, 784)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, fused=True)

    def project() -> None:
        out = module.training_step(x, 0)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        torch.stack([out["terms"][term] for term in ("rec", "kl", "loss")])  # TrainingHistory's per-step work

    def bare() -> None:
        loss = bare_loss(module.model, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def us_per_step(step) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps * 1e6

    us_per_step(project), us_per_step(bare)  # warm
    timings = [(us_per_step(project), us_per_step(bare)) for _ in range(rounds)]
    return statistics.median(p for p, _ in timings), statistics.median(b for _, b in timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds of the step timings")
    args = parser.parse_args()
    data_dir = default_data_dir()
    ensure_dataset(data_dir, download=True)
    skip_nvml_probe_without_gpu()

    seconds: collections.Counter = collections.Counter()
    lightning_hooks, call._call_callback_hooks = call._call_callback_hooks, timed_callback_hooks(seconds)
    try:
        epoch_times, val_times = project_epochs(data_dir, args.epochs, ["trainer.accelerator=cpu"])
    finally:
        call._call_callback_hooks = lightning_hooks
    project_step, bare_step = step_costs(args.rounds)

    print(f"machine: {machine(torch.device('cpu'))}")
    epoch = statistics.median(epoch_times)
    print(f"\n(b) {epoch:.3f} s per epoch (median of {args.epochs}), {STEPS} steps\n")
    print("| where | ms per epoch | share of (b) |")
    print("|---|---|---|")
    for (name, kind), total in sorted(seconds.items(), key=lambda item: -item[1]):
        ms = total / args.epochs * 1e3
        if kind.startswith("on_train_end"):
            if total >= 1e-3:
                print(f"| {name}, {kind} (not in an epoch) | {total * 1e3:.1f} once | |")
        elif ms >= 1:
            print(f"| {name}, hooks {kind} | {ms:.1f} | {ms / 1e3 / epoch:.1%} |")
    val = statistics.median(val_times)
    print(f"| validation, 10k test images | {val * 1e3:.1f} | {val / epoch:.1%} |")
    extra = (project_step - bare_step) * STEPS / 1e3
    print(
        f"| the module's step beyond the bare step ({project_step:.0f} - {bare_step:.0f} us, x {STEPS}) "
        f"| {extra:.1f} | {extra / 1e3 / epoch:.1%} |"
    )


if __name__ == "__main__":
    main()
