"""A Hydra callback that summarises a multirun when it ends: ``summary.csv`` and ``summary.md``
in the sweep dir, one row per job (its overrides and final metrics); when the jobs vary ``seed``,
also ``summary_by_setting.csv``: the jobs that differ only in their seed grouped, with the mean
and standard deviation of each metric over them."""

from __future__ import annotations

import csv
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vae_lightning.errors import UserError
from vae_lightning.names import SEED_METRICS, SUMMARY_COLUMNS, current_name
from vae_lightning.outputs import read_json, read_overrides
from vae_lightning.runs.results import run_finished
from vae_lightning.tracking.mlflow_store import close_sweep_run, open_sweep_run
from vae_lightning.workarounds import read_submitit_jobs_without_a_result, set_for_every_job


def job_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [d for d in sweep_dir.iterdir() if d.is_dir() and (d / ".hydra" / "overrides.yaml").is_file()]
    return sorted(jobs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else d.name))


def summarise(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Read every job's overrides and ``metrics.json``; write and return the summary rows."""
    sweep_dir = Path(sweep_dir)
    jobs = job_dirs(sweep_dir)
    # a job whose file is broken keeps its row (by its status), without overrides
    overrides = {job: read_overrides(job) or [] for job in jobs}
    # what every job shares goes in the header; each row shows what this job varies
    readable = [set(o) for o in overrides.values() if o]
    common = set.intersection(*readable) if len(readable) > 1 else set()
    rows, finished = [], []
    for job in jobs:
        metrics = read_json(job / "metrics.json")
        if metrics is None:
            status = "failed (no readable metrics.json)"
        elif run_finished(metrics):
            status = "completed"
        else:  # killed: no reason was left, and what it finished is kept in its dir
            status = metrics.get("status", "stopped before it finished (continue it with ckpt_path=last)")
        metrics = {current_name(key): value for key, value in (metrics or {}).items()}  # older runs' names too
        varied = " ".join(o for o in overrides[job] if o not in common)
        row: dict[str, Any] = {"job": job.name, "overrides": varied, "status": status}
        for key in SUMMARY_COLUMNS[3:]:
            value = metrics.get(key)
            row[key] = round(value, 3) if isinstance(value, float) else value
        rows.append(row)
        if status == "completed":
            finished.append((overrides[job], metrics))
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join("" if row[c] is None else str(row[c]) for c in SUMMARY_COLUMNS) + " |" for row in rows]
    shared = " ".join(o for o in next(iter(overrides.values()), []) if o in common) or "none"
    header = f"# Sweep {sweep_dir.name}\n\nOverrides shared by every job: `{shared}`\n\n"
    text = header + "\n".join(lines) + "\n"
    if any(o.startswith("seed=") for o in set().union(*overrides.values()) - common):
        text += _write_by_setting(sweep_dir, finished, common)
    (sweep_dir / "summary.md").write_text(text)
    return rows


def over_seeds(finished: list[tuple[list[str], dict[str, Any]]], common: set[str]) -> list[dict[str, Any]]:
    """The finished jobs that differ only in ``seed=``, grouped: per setting n, the seeds, and each
    metric's mean and sample standard deviation (none when n = 1). A metric that not every one of
    the n jobs has gets no mean: a mean over fewer jobs than n would pass for one over n."""
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for job_overrides, metrics in finished:
        setting = " ".join(o for o in job_overrides if o not in common and not o.startswith("seed="))
        seed = next((o.split("=", 1)[1] for o in job_overrides if o.startswith("seed=")), "?")
        # a sweep over seeds alone: its one setting is what every job shares
        setting = setting or " ".join(o for o in job_overrides if o in common) or "(defaults)"
        groups.setdefault(setting, []).append((seed, metrics))
    table = []
    for setting, jobs in groups.items():
        row: dict[str, Any] = {"setting": setting, "n": len(jobs), "seeds": " ".join(seed for seed, _ in jobs)}
        for key in SEED_METRICS:
            values = [m[key] for _, m in jobs if isinstance(m.get(key), int | float)]
            every = len(values) == len(jobs)
            row[f"{key} mean"] = statistics.fmean(values) if values and every else None
            row[f"{key} std"] = statistics.stdev(values) if len(values) > 1 and every else None
        table.append(row)
    return table


def _write_by_setting(sweep_dir: Path, finished: list, common: set[str]) -> str:
    table = over_seeds(finished, common)
    columns = ["setting", "n", "seeds", *(f"{key} {stat}" for key in SEED_METRICS for stat in ("mean", "std"))]
    with (sweep_dir / "summary_by_setting.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)

    def cell(row: dict[str, Any], key: str) -> str:
        mean, std = row[f"{key} mean"], row[f"{key} std"]
        return "" if mean is None else f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}")

    lines = ["| setting | n | " + " | ".join(SEED_METRICS) + " |", "|" + "---|" * (len(SEED_METRICS) + 2)]
    lines += [f"| {r['setting']} | {r['n']} | " + " | ".join(cell(r, k) for k in SEED_METRICS) + " |" for r in table]
    intro = "\n## Over seeds\n\nFinished jobs that differ only in their seed: mean ± standard deviation (n - 1)\n\n"
    return intro + "\n".join(lines) + "\n"


SWEEPING = re.compile(r"^(choice|range|interval|glob|shuffle|sort)\(|,")


class SweepSummary(Callback):
    """Registered in ``conf/hydra/default.yaml``; runs in the launching process. Before the jobs
    start, it names each job by the overrides the sweep varies (Hydra's ``override_dirname``
    without the shared ones): TensorBoard shows the jobs by those names."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        keys = [o.split("=", 1)[0].lstrip("+~") for o in config.hydra.overrides.task]
        values = [o.split("=", 1)[-1] for o in config.hydra.overrides.task]
        varied = {key for key, value in zip(keys, values, strict=True) if SWEEPING.search(value)}
        varied |= set(OmegaConf.select(config, "hydra.sweeper.params") or {})  # an Optuna search's
        shared = sorted(set(keys) - varied)
        set_for_every_job(config, "hydra.job.config.override_dirname.exclude_keys", shared)
        if "submitit" in str(OmegaConf.select(config, "hydra.launcher._target_")):
            read_submitit_jobs_without_a_result()  # a cancelled job is one line, not the sweep's end
        try:
            open_sweep_run(config)  # with logger=mlflow: the sweep's parent run (after RunDir chose the dir)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = summarise(sweep_dir)
        print(f"Sweep summary of {len(rows)} jobs: {sweep_dir / 'summary.md'}")
        failed = [row["job"] for row in rows if row["status"] != "completed"]
        close_sweep_run(config, sweep_dir, bool(failed))
        if failed:  # the other jobs ran to the end; the exit code says not all of them finished
            which = f"{len(failed)} of {len(rows)} jobs failed ({', '.join(failed)})"
            print(f"error: {which}; see {sweep_dir / 'summary.md'}", file=sys.stderr)
            raise SystemExit(1)
