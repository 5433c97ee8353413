"""Lightning DDP on the CPU (2 processes over gloo) through the same command a user runs."""

import csv
import math

import lightning as L
import pytest
import torch
from helpers import REPO, brief_run, compose_train, epoch_rows, load_checkpoint, run_cli
from mlflow.tracking import MlflowClient

from vae_lightning.data.datamodule import MNISTDataModule
from vae_lightning.launch import processes
from vae_lightning.runs.building import build
from vae_lightning.training.module import VAEModule


@pytest.mark.slow
def test_two_process_ddp_means_the_same_as_one_process(trained_run, mnist_dir, tmp_path):
    single_dir, _ = trained_run  # 1 process, batch 128
    ddp_dir = tmp_path / "ddp"
    result = run_cli(
        "vae_lightning.train", "trainer=ddp", "trainer.devices=2", "data.batch_size=64",  # 2 x 64 = 128 a step
        "trainer.max_epochs=1", "eval.k=2", "test=false",
        f"data.data_dir={mnist_dir}", f"hydra.run.dir={ddp_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr + result.stdout
    ddp, single = epoch_rows(ddp_dir), epoch_rows(single_dir)
    assert len(ddp) == 1  # written once, by rank 0
    # per-image epoch losses over all 60k images seen by both processes: the 1-process run's, within noise
    assert float(ddp[0]["train/loss"]) == pytest.approx(float(single[0]["train/loss"]), abs=2.5)
    assert float(ddp[0]["val/loss"]) == pytest.approx(float(single[0]["val/loss"]), abs=2.5)
    # val/* on 2 processes (each half the test set, synced) equals one process on all of it
    module = VAEModule.load_from_checkpoint(ddp_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    again = trainer.validate(module, datamodule=MNISTDataModule(str(mnist_dir)), verbose=False)[0]
    assert again["val/loss"] == pytest.approx(float(ddp[0]["val/loss"]), abs=0.3)
    assert len(list((ddp_dir / "tensorboard").glob("events.out.tfevents.*"))) >= 1
    assert not list(ddp_dir.glob("**/epochs*.csv"))[1:]  # no second copy from the other rank
    for name in ("samples.png", "loss_curves.png", "metrics.json", "checkpoints/last.ckpt"):
        assert (ddp_dir / name).exists(), name
    # each process drew its own noise for its own images: their generators went separate ways
    states = load_checkpoint(ddp_dir / "checkpoints" / "last.ckpt")["rng_states"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])


@pytest.mark.slow
def test_a_multirun_whose_jobs_use_ddp(mnist_dir, tmp_path):
    """Lightning re-runs the command line for the other processes; in a sweep each job's children
    must run that job alone (not the sweep) and each job needs its own process group."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        "vae_lightning.train", "-m", "trainer=ddp", "trainer.devices=2", "model.latent_dim=2,4",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=20", "eval.k=2", "logger=many",
        f"data.data_dir={mnist_dir}", f"hydra.sweep.dir={sweep}", f"paths.log_dir={tmp_path / 'logs'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # MLflow: only the first process of each job logs: the sweep's run and one child per job
    client = MlflowClient(f"sqlite:///{tmp_path / 'logs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vae_lightning").experiment_id])
    names = sorted(run.info.run_name for run in runs)
    assert names == ["sweep", "sweep/model.latent_dim=2", "sweep/model.latent_dim=4"]
    for run in runs:
        if run.info.run_name != "sweep":
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_step")]
            assert sorted(steps) == list(range(20)), run.info.run_name  # each step once, not once per process
    output = result.stdout + result.stderr
    assert output.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 2  # one child per job
    assert sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir()) == ["0", "1"]
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert [r["overrides"] for r in rows] == ["model.latent_dim=2", "model.latent_dim=4"]


def test_the_default_trains_in_one_process_and_ddp_asks_for_more(tmp_path):
    default = compose_train(tmp_path)
    assert processes(default.trainer) == 1
    trainer = build(default.trainer, "trainer", logger=False)
    assert trainer.num_devices == 1 and trainer.world_size == 1
    ddp = compose_train(tmp_path, "trainer=ddp")
    assert processes(ddp.trainer) == 2 and ddp.trainer.accelerator == "cpu"  # gloo, even beside a GPU
    assert processes(compose_train(tmp_path, "trainer=ddp", "trainer.devices=2", "trainer.num_nodes=2").trainer) == 4


@pytest.mark.slow
def test_a_divergence_on_one_process_stops_every_process(mnist_dir, tmp_path):
    result = run_cli(
        "vae_lightning.train", "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=1",
        "+callbacks.poison._target_=faulty_callbacks.PoisonOnRank", "+callbacks.poison.rank=1",
        "+callbacks.poison.step=100",  # the last step of the first block of logged steps
        f"data.data_dir={mnist_dir}", f"hydra.run.dir={tmp_path}",
        env={"PYTHONPATH": str(REPO / "tests")},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: training diverged")]
    assert len(errors) == 2, result.stderr[-3000:]  # each process says it once, none waits for a timeout
    assert any("at step 100 of epoch 1" in e for e in errors)
    assert any("the loss of another process became infinite or NaN by step 100" in e for e in errors)


@pytest.mark.slow
def test_bf16_true_trains_tests_and_draws_end_to_end(mnist_dir, tmp_path):
    metrics = brief_run(tmp_path, mnist_dir, "trainer.precision=bf16-true")
    assert 150 < metrics["train/loss"] < 400 and math.isfinite(metrics["test/iw_nll"])
    # the running sums stay fp32: the epoch value is not rounded to bf16's 3 significant digits
    assert metrics["train/loss"] != float(torch.tensor(metrics["train/loss"]).bfloat16())
    for name in ("samples.png", "reconstructions.png", "latent_scatter.png"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.slow
def test_an_optuna_search_whose_trials_use_ddp(mnist_dir, tmp_path):
    """Each trial's children run that trial alone, not a search of their own."""
    sweep = tmp_path / "optuna"
    result = run_cli(
        "vae_lightning.train", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "trainer=ddp",
        "trainer.devices=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=20", "eval.k=2",
        f"data.data_dir={mnist_dir}", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir()) == ["0", "1"]  # no nested searches
    with (sweep / "summary.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["completed", "completed"]
    assert "best_value" in (sweep / "optimization_results.yaml").read_text()


@pytest.mark.slow
def test_a_ddp_sweep_continues_job_by_job(mnist_dir, tmp_path):
    """ckpt_path=last in a sweep: each job's children continue from that job's own last.ckpt."""
    sweep = tmp_path / "sweep"
    args = ["-m", "trainer=ddp", "trainer.devices=2", "model.latent_dim=2,4", "+trainer.limit_train_batches=20"]
    args += ["eval.k=0", "test=false", f"data.data_dir={mnist_dir}", f"hydra.sweep.dir={sweep}"]
    first = run_cli("vae_lightning.train", *args, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli("vae_lightning.train", *args, "trainer.max_epochs=2", "ckpt_path=last")
    assert again.returncode == 0, again.stderr[-3000:]
    for job in ("0", "1"):
        assert f"Continuing the run in {sweep / job} from" in again.stdout, job
        assert [row["epoch"] for row in epoch_rows(sweep / job)] == ["1", "2"], job
        assert load_checkpoint(sweep / job / "checkpoints" / "last.ckpt")["epoch"] == 1
