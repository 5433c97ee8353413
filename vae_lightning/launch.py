"""Where a run's processes, threads and TensorBoard files go: the ``${tensorboard:...}`` resolver,
how many processes the trainer config asks for and how many threads each uses, and ending a DDP
process group cleanly."""

from __future__ import annotations

import os

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf


def tensorboard_location(part: str, *, _root_: DictConfig) -> str:
    """``${tensorboard:save_dir}`` and ``${tensorboard:name}`` in ``conf/logger/tensorboard.yaml``:
    ``<run dir>/tensorboard`` for a run, ``<sweep dir>/<what this job varies>`` for a sweep job, so
    that ``tensorboard --logdir <sweep dir>`` names each job's curves by its settings."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        job = HydraConfig.get()
        return job.sweep.dir if part == "save_dir" else job.job.override_dirname or f"job_{job.job.num}"
    return _root_.paths.output_dir if part == "save_dir" else "tensorboard"


if not OmegaConf.has_resolver("tensorboard"):
    OmegaConf.register_new_resolver("tensorboard", tensorboard_location)


def end_process_group() -> None:
    """A DDP process ends its process group itself when its job ends. Left to the interpreter's
    exit, gloo's threads can be torn down while in use ("terminate called without an active
    exception"), and Lightning then kills the whole sweep for a child that crashed on its way out."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, a cgroup, a scheduler's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_for_this_run(threads: int | None) -> int | None:
    """The CPU threads a run's math uses: ``threads`` when set; else none decided here when
    ``OMP_NUM_THREADS`` is set (torch follows it); else the usable cores, shared evenly between the
    jobs a parallel launcher (joblib) runs at once, so that jobs side by side do not fight over cores."""
    if threads is not None:
        return int(threads)
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = usable_cores()
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        launcher = HydraConfig.get().launcher
        if "joblib" in str(launcher.get("_target_", "")):
            n_jobs = launcher.get("n_jobs") or -1
            at_once = cores if n_jobs < 0 else min(n_jobs, cores)
            return max(1, cores // max(1, at_once))
    return cores


def slurm_restarts() -> int:
    """How many times Slurm has requeued this job (``SLURM_RESTART_COUNT``: a pre-emption, a node
    failure, or ``scontrol requeue`` by submitit at the time limit); 0 on a first start and outside Slurm."""
    count = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(count) if count.isdigit() else 0


# what launchers set for a process that is not a job's first: Lightning (torchrun's too), Slurm
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def first_process() -> bool:
    """Whether this is the first process of its job on the first node: the one that writes the
    run dir (Lightning's ``rank_zero_only`` reads no node rank, and the other nodes start as
    separate commands)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def processes(trainer_cfg: DictConfig) -> int:
    """How many training processes the trainer config asks for (devices x nodes)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    count = len(devices) if OmegaConf.is_list(devices) else devices if isinstance(devices, int) else 1
    if count == -1 or devices == "auto":  # every device found
        count = max(1, torch.cuda.device_count()) if trainer_cfg.get("accelerator") in ("gpu", "cuda") else 1
    return count * int(trainer_cfg.get("num_nodes", 1) or 1)
