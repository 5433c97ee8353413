"""Hydra multirun: every job complete, a summary when the sweep ends, HPARAMS in TensorBoard."""

import csv

import pytest
from helpers import run_cli
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from vae_lightning.runs.sweep import summarise
from vae_lightning.workarounds import hydra_quoted


def hparams_plugin_present(tensorboard_dir) -> bool:
    for events in tensorboard_dir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(events)).Load():
            if any(v.metadata.plugin_data.plugin_name == "hparams" for v in event.summary.value):
                return True
    return False


@pytest.mark.slow
def test_multirun_over_latent_size_and_lr(mnist_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "vae_lightning.train", "-m", "model.latent_dim=2,8", "model.lr=1e-3,3e-4",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=40", "eval.k=5",
        f"data.data_dir={mnist_dir}", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert jobs == ["0", "1", "2", "3"]
    for job in jobs:
        for name in ("epochs.csv", "loss_curves.png", "samples.png", "metrics.json", "checkpoints/last.ckpt"):
            assert (sweep / job / name).exists(), (job, name)
    assert (sweep / "0" / "manifold.png").exists() and not (sweep / "2" / "manifold.png").exists()
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["overrides"] for r in rows] == [
        "model.latent_dim=2 model.lr=0.001", "model.latent_dim=2 model.lr=0.0003",
        "model.latent_dim=8 model.lr=0.001", "model.latent_dim=8 model.lr=0.0003",
    ]  # fmt: skip
    for row in rows:
        assert row["status"] == "completed" and row["epochs"] == "1"
        assert float(row["val/loss"]) == pytest.approx(float(row["val/rec"]) + float(row["val/kl"]), abs=0.01)
        assert float(row["test/iw_nll"]) > 0 and float(row["bound_seconds"]) > 0
        assert 0 < float(row["train_seconds"]) < float(row["wall_seconds"])
    # tensorboard --logdir <sweep> names each job's run by what it varies, not by its number
    runs = sorted(p.name for p in sweep.iterdir() if list(p.glob("events.out.tfevents.*")))
    assert runs == sorted(r["overrides"].replace(" ", ",") for r in rows)
    assert all(hparams_plugin_present(sweep / run) for run in runs)
    summary_md = (sweep / "summary.md").read_text()
    assert "| job | overrides | status |" in summary_md and "trainer.max_epochs=1" in summary_md


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "values"), [("joblib", "2,8"), ("submitit_local", "2")], ids=["joblib", "submitit_local"]
)
def test_launcher_plugins(mnist_dir, tmp_path, launcher, values):
    sweep = tmp_path / launcher
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    result = run_cli(
        "vae_lightning.train", "-m", f"hydra/launcher={launcher}", *extra, f"model.latent_dim={values}",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=20", "eval.k=2",
        f"data.data_dir={mnist_dir}", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(values.split(",")) and all(r["status"] == "completed" for r in rows)
    assert rows[0]["overrides"].startswith("model.latent_dim=2")
    for job in range(len(rows)):
        assert (sweep / str(job) / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_optuna_search_minimises_val_loss_and_goes_on_past_a_diverged_trial(mnist_dir, tmp_path):
    sweep = tmp_path / "optuna"
    result = run_cli(
        "vae_lightning.train", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=3", "model.lr=choice(10,0.001)", "model.latent_dim=choice(2,20)",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=20",
        "eval.k=2", f"data.data_dir={mnist_dir}", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 1  # the search went on to the end, then says a trial failed
    assert "jobs failed" in result.stderr.strip().splitlines()[-1]
    best = (sweep / "optimization_results.yaml").read_text()
    assert "model.latent_dim" in best and "model.lr: 0.001" in best
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    # the sampler (seeded) tries lr=10 too: that trial is recorded as failed and the search goes on
    failed = [r for r in rows if r["status"].startswith("failed: training diverged")]
    completed = [r for r in rows if r["status"] == "completed"]
    assert failed and completed and all("model.lr=10" in r["overrides"] for r in failed)
    best_value = float(best.split("best_value:")[1])
    assert best_value == pytest.approx(min(float(r["val/loss"]) for r in completed), abs=1e-3)


def test_the_summary_lists_jobs_without_a_readable_metrics_json_as_failed(tmp_path):
    metrics = {"0": '{"epochs": 2, "val/loss": 101.23456, "wall_seconds": 9.5}'}
    metrics |= {"1": '{"status": "failed: training diverged"}'}
    metrics |= {"2": "", "3": None}  # a disk that filled up mid-write; a job killed before the end
    for job, text in metrics.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- model.latent_dim={job}\n- seed=1\n")
        if text is not None:
            (tmp_path / job / "metrics.json").write_text(text)
    rows = summarise(tmp_path)
    assert [(r["overrides"], r["status"]) for r in rows] == [
        ("model.latent_dim=0", "completed"),
        ("model.latent_dim=1", "failed: training diverged"),
        ("model.latent_dim=2", "failed (no readable metrics.json)"),
        ("model.latent_dim=3", "failed (no readable metrics.json)"),
    ]
    assert rows[0]["epochs"] == 2 and rows[0]["val/loss"] == 101.235
    assert "Overrides shared by every job: `seed=1`" in (tmp_path / "summary.md").read_text()


def test_a_job_with_a_broken_overrides_file_keeps_its_row_and_the_others_their_shared_header(tmp_path):
    files = {"0": "- model.latent_dim=2\n- seed=1\n", "1": "- model.latent_dim=3\n- seed=1\n", "2": "{not: [yaml"}
    for job, text in files.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(text)
        (tmp_path / job / "metrics.json").write_text('{"epochs": 2, "val/loss": 101.0, "wall_seconds": 9.5}')
    rows = summarise(tmp_path)
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        ("0", "model.latent_dim=2", "completed"),
        ("1", "model.latent_dim=3", "completed"),
        ("2", "", "completed"),
    ]
    assert "Overrides shared by every job: `seed=1`" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("value", ["/tmp/it's logs", "/tmp/a\\'b", "/tmp/ends\\", "a,b=c d", "/tmp/'quoted'"])
def test_a_path_is_quoted_as_hydra_reads_it_back(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([f"hydra.sweep.dir={hydra_quoted(value)}"])
    assert override.value() == value


@pytest.mark.slow
def test_a_sweep_in_a_log_dir_with_a_quote_in_its_name(mnist_dir, tmp_path):
    log_dir = tmp_path / "it's logs"
    result = run_cli(
        "vae_lightning.train", "-m", "model.latent_dim=2,3", "trainer.max_epochs=1", "+trainer.limit_train_batches=5",
        "eval.k=0", "test=false", f"data.data_dir={mnist_dir}", f'paths.log_dir="{log_dir}"',
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (log_dir / "train" / "multiruns").iterdir()
    assert [row["status"] for row in csv.DictReader((sweep / "summary.csv").open())] == ["completed"] * 2
