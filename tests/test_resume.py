"""What ckpt_path continues and where, decided before a run starts (in-process, no training)."""

from pathlib import Path

import pytest
from helpers import CONF_DIR
from hydra import compose, initialize_config_dir

from vae_lightning.errors import UserError
from vae_lightning.runs.resume import changed_data_settings, plan_resume, resolve
from vae_lightning.runs.rundir import RunDir


def run_to_continue(ckpt_path, log_dir):
    continuation = resolve(ckpt_path, log_dir)
    return continuation.run_dir if continuation else None


def make_run(log_dir: Path, name: str, epochs: int | None = None) -> Path:
    run = log_dir / "train" / "runs" / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("data:\n  batch_size: 128\n  data_dir: null\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not read here")
    if epochs is not None:
        (run / "metrics.json").write_text(f'{{"epochs": {epochs}, "wall_seconds": 1.0}}')  # a finished run
    return run


def hydra_config(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_last_is_the_newest_run_and_a_run_or_its_checkpoint_is_that_run(tmp_path):
    with pytest.raises(UserError, match=rf"ckpt_path=last but no run in {tmp_path}/train/runs has checkpoints/last"):
        run_to_continue("last", tmp_path)
    older, newer = make_run(tmp_path, "2026-01-01_00-00-00"), make_run(tmp_path, "2026-01-02_00-00-00")
    assert run_to_continue("last", tmp_path) == newer.resolve()
    assert run_to_continue(str(older), tmp_path) == older.resolve()
    assert run_to_continue(str(older / "checkpoints" / "last.ckpt"), tmp_path) == older.resolve()
    loose = tmp_path / "shared.ckpt"
    loose.write_bytes(b"")
    assert run_to_continue(str(loose), tmp_path) is None  # a new run starts from it
    assert run_to_continue(None, tmp_path) is None


def test_a_continued_run_writes_in_its_own_dir_and_keeps_its_first_config(tmp_path):
    run = make_run(tmp_path, "2026-01-01_00-00-00")
    cfg = hydra_config("ckpt_path=last", f"paths.log_dir={tmp_path}")
    RunDir(continue_runs=True).on_run_start(cfg)
    assert Path(cfg.hydra.run.dir) == run.resolve()
    assert cfg.ckpt_path == str((run / "checkpoints" / "last.ckpt").resolve())  # resolved once, here
    assert cfg.hydra.output_subdir.startswith(".hydra/continued_")  # .hydra/ itself is left as it was
    fresh = hydra_config(f"paths.log_dir={tmp_path}")
    RunDir(continue_runs=True).on_run_start(fresh)
    assert "runs/" in fresh.hydra.run.dir and Path(fresh.hydra.run.dir) != run.resolve()


def test_last_with_a_named_run_dir_continues_that_run(tmp_path, capsys):
    named, newer = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    cfg = hydra_config("ckpt_path=last", f"paths.log_dir={tmp_path}", f"hydra.run.dir={named}")
    RunDir(continue_runs=True).on_run_start(cfg)
    assert Path(cfg.hydra.run.dir) == named and newer != named
    empty = tmp_path / "empty"
    cfg = hydra_config("ckpt_path=last", f"hydra.run.dir={empty}")
    with pytest.raises(SystemExit):
        RunDir(continue_runs=True).on_run_start(cfg)
    said = capsys.readouterr().err
    assert said == f"error: ckpt_path=last but {empty} has no checkpoints/last.ckpt; name another run\n"


def test_plan_resume_for_runs_and_sweep_jobs(tmp_path):
    run = make_run(tmp_path, "r")
    assert plan_resume(None, run, 10, sweep_job=False).checkpoint is None
    assert plan_resume("last", run, 10, sweep_job=False).checkpoint == (run / "checkpoints" / "last.ckpt").resolve()
    assert plan_resume(str(run), tmp_path / "elsewhere", 10, sweep_job=True).checkpoint.parent.parent == run.resolve()
    job = make_run(tmp_path, "job", epochs=10)
    assert plan_resume("last", job, 10, sweep_job=True).finished["epochs"] == 10  # kept, not run again
    (job / "metrics.json").write_text('{"epochs": 10}')  # stopped in its test pass: no wall_seconds yet
    assert plan_resume("last", job, 10, sweep_job=True).finished is None  # continued, to finish its test pass
    assert plan_resume("last", job, 12, sweep_job=True).checkpoint is not None  # lengthened
    assert plan_resume("last", tmp_path / "new_job", 10, sweep_job=True).checkpoint is None  # starts
    with pytest.raises(UserError, match="has no checkpoints/last.ckpt"):
        plan_resume("last", tmp_path / "new_run", 10, sweep_job=False)


def test_a_continuation_with_other_data_settings_is_recorded(tmp_path):
    run = make_run(tmp_path, "r")
    cfg = hydra_config("data.batch_size=64")
    assert changed_data_settings(cfg, run) == ", with data.batch_size=64 (the run started with 128)"
    assert changed_data_settings(hydra_config(), run) == ""


def test_runs_started_in_the_same_second_get_dirs_of_their_own(tmp_path):
    dirs = []
    for _ in range(3):
        cfg = hydra_config(f"paths.log_dir={tmp_path}", "hydra.run.dir=" + "${paths.log_dir}/runs/same_second")
        cfg.hydra.overrides.hydra = []  # as if the dir came from the default pattern
        RunDir().on_run_start(cfg)
        dirs.append(cfg.hydra.run.dir)
    assert dirs == [f"{tmp_path}/runs/same_second", f"{tmp_path}/runs/same_second_2", f"{tmp_path}/runs/same_second_3"]


def test_sweeps_started_in_the_same_second_get_dirs_of_their_own_which_their_jobs_use(tmp_path):
    seen = []
    for _ in range(2):
        cfg = hydra_config(f"paths.log_dir={tmp_path}", "hydra.sweep.dir=" + "${paths.log_dir}/multiruns/same_second")
        cfg.hydra.overrides.hydra = []  # as if the dir came from the default pattern
        RunDir().on_multirun_start(cfg)
        # Hydra composes each job's config again from the Hydra overrides: the job must see the claimed dir
        job = hydra_config(*cfg.hydra.overrides.hydra)
        seen.append((cfg.hydra.sweep.dir, job.hydra.sweep.dir))
    first, second = f"{tmp_path}/multiruns/same_second", f"{tmp_path}/multiruns/same_second_2"
    assert seen == [(first, first), (second, second)]
