"""Seeds trained as one batched model (training.replicas): each replica is its job alone."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import epoch_rows, kill_early_in_epoch_2, run_cli, run_in_one_interpreter
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vae_lightning.data.datamodule import binarize
from vae_lightning.errors import UserError
from vae_lightning.model.objectives import OBJECTIVES, Progress
from vae_lightning.training.module import VAEModule
from vae_lightning.training.replicas import ReplicaGroup, ReplicaNoise, global_generator

SMALL_MLP = {"name": "mlp", "hidden": [32], "activation": "relu"}
# one of every built-in part, each with settings that make it quick
PARTS = {
    "elbo": {"net": SMALL_MLP},
    "beta_warmup": {"net": SMALL_MLP, "beta": 0.5, "kl_warmup_epochs": 1},
    "iwae": {"net": SMALL_MLP, "objective": "iwae", "k": 3},
    "free_bits": {"net": SMALL_MLP, "objective": "free_bits", "free_bits": 0.5},
    "beta_tcvae": {"net": SMALL_MLP, "objective": "beta_tcvae", "tc_beta": 6.0},
    "conv": {"net": {"name": "conv", "channels": [4, 8]}},
    "tanh": {"net": {"name": "mlp", "hidden": [16, 16], "activation": "tanh"}},
    "continuous_bernoulli": {"net": SMALL_MLP, "likelihood": "continuous_bernoulli"},
    "gaussian": {"net": SMALL_MLP, "likelihood": "gaussian"},
    "mog": {"net": SMALL_MLP, "prior": "mog", "prior_components": 5},
    "vamp": {"net": SMALL_MLP, "prior": "vamp", "prior_components": 5},
}


def _built(settings: dict, seed: int) -> tuple[VAEModule, torch.Generator]:
    L.seed_everything(seed, verbose=False)
    module = VAEModule.from_settings(**{"latent_dim": 4, **settings})
    return module, global_generator(torch.device("cpu"))


@pytest.mark.parametrize("part", PARTS)
def test_every_part_steps_as_replicas_as_it_would_alone(part):
    """Three steps of two seeds as one model against each seed's module stepped alone (its noise
    and binarization from the global generator, as a job draws them): the same per-image terms
    and the same weights, to float tolerance."""
    settings, seeds, steps = PARTS[part], (3, 4), 3
    images = torch.rand(2, 16, 784)  # one batch of continuous pixels per seed
    alone = []
    for j, seed in enumerate(seeds):
        module, _ = _built(settings, seed)
        optimizer = module.configure_optimizers()
        values = []
        for step in range(steps):
            x = binarize(images[j])  # from the global generator, as a job's dynamic binarization
            loss, terms = module.objective.loss_and_terms(module.model, x, None, Progress(step, 2))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            values.append({t: v.detach().clone() for t, v in terms.items()})
        alone.append((values, {k: v.detach().clone() for k, v in module.model.state_dict().items()}))

    built = [_built(settings, seed) for seed in seeds]
    group = ReplicaGroup([m for m, _ in built], [g for _, g in built])
    for step in range(steps):
        x = torch.stack([binarize(images[j], g) for j, (_, g) in enumerate(built)])
        terms = group.train_step(x, Progress(step, 2))
        for j in range(len(seeds)):
            for term, value in terms.items():
                torch.testing.assert_close(value[j], alone[j][0][step][term], rtol=1e-4, atol=1e-3)
    for j, (module, _) in enumerate(built):
        for key, value in module.model.state_dict().items():
            torch.testing.assert_close(value, alone[j][1][key], rtol=1e-4, atol=1e-5)


def test_a_replica_that_diverges_stops_alone():
    """A replica whose weights became NaN stops stepping; the other's steps are those it takes alone."""
    built = [_built(PARTS["elbo"], seed) for seed in (0, 1)]
    reference = copy.deepcopy(built[1][0])
    reference_noise = copy.deepcopy(built[1][1])
    group = ReplicaGroup([m for m, _ in built], [g for _, g in built])
    with torch.no_grad():
        next(iter(group.stacked.values()))[0].fill_(float("nan"))
    group.alive[0] = False
    x = (torch.rand(2, 16, 784) > 0.5).float()
    terms = group.train_step(x, Progress())
    assert torch.isnan(terms["loss"][0]).all()
    expected = reference.objective.loss_and_terms(reference.model, x[1], reference_noise, Progress())[1]
    torch.testing.assert_close(terms["loss"][1], expected["loss"])


def test_jobs_of_different_shapes_are_refused_in_one_line():
    built = [_built(PARTS["elbo"], 0), _built({**PARTS["elbo"], "latent_dim": 5}, 1)]
    with pytest.raises(UserError, match=r"model.latent_dim differs") as err:
        ReplicaGroup([m for m, _ in built], [g for _, g in built])
    assert "\n" not in str(err.value)


def test_replica_noise_gives_each_replica_its_own_stream():
    generators = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    noise = ReplicaNoise(generators)

    def draw(index):
        noise.index = index
        return noise.standard_normal((2, 3), torch.device("cpu"), torch.float32)

    drawn = torch.func.vmap(draw, randomness="same")(torch.arange(3))
    for j, seed in enumerate((5, 6, 7)):
        torch.testing.assert_close(drawn[j], torch.randn((2, 3), generator=torch.Generator().manual_seed(seed)))


REPLICA_SWEEP = ["-m", "seed=0,1,2", "data.binarize=dynamic", "trainer.max_epochs=2", "+trainer.limit_train_batches=30",
                 "+trainer.limit_val_batches=3", "eval.k=2"]  # fmt: skip


def _files(job: Path) -> set[str]:
    return {str(p.relative_to(job)) for p in job.rglob("*") if p.is_file() and ".hydra" not in p.parts}


def _scalar_steps(tensorboard: Path) -> dict[str, list[int]]:
    steps: dict[str, list[int]] = {}
    for events in sorted(tensorboard.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return {tag: sorted(s) for tag, s in steps.items()}


@pytest.mark.slow
def test_a_replica_sweep_writes_what_its_jobs_write_alone(tmp_path, mnist_dir):
    """Three seeds on real MNIST (dynamically binarized, 2 epochs of 30 steps), once with
    hydra/launcher=replicas and once with the basic launcher: each job's epochs.csv within 0.01
    nats of its run alone (measured: equal to the 6 digits printed, but for val's last digits),
    the same files (checkpoints, figures, report), the same TensorBoard tags at the same steps,
    and test numbers; its checkpoint exports as any run's. Killed in epoch 2 and continued, the
    sweep ends with the uninterrupted one's numbers. Jobs of two shapes form two groups."""
    replicas, alone = tmp_path / "replicas", tmp_path / "alone"
    data = f"data.data_dir={mnist_dir}"
    results = run_in_one_interpreter([
        ["python", "-m", "vae_lightning.train", *REPLICA_SWEEP, "hydra/launcher=replicas", data,
         f"hydra.sweep.dir={replicas}"],
        ["python", "-m", "vae_lightning.train", *REPLICA_SWEEP, data, f"hydra.sweep.dir={alone}"],
        ["python", "-m", "vae_lightning.export", f"ckpt_path={replicas / '1'}", "format=safetensors",
         f"hydra.run.dir={tmp_path / 'export'}"],
        ["python", "-m", "vae_lightning.train", "-m", "hydra/launcher=replicas", "model.latent_dim=2,3", data,
         "trainer.max_epochs=1", "+trainer.limit_train_batches=5", "eval.k=0", f"hydra.sweep.dir={tmp_path / 'two'}"],
        ["python", "-m", "vae_lightning.train", "-m", "hydra/launcher=replicas", "seed=0,1", data,
         "+trainer.accumulate_grad_batches=2", f"hydra.sweep.dir={tmp_path / 'refused'}"],
    ])  # fmt: skip
    assert [code for code, _, _ in results] == [0, 0, 0, 0, 1], [err[-3000:] for _, _, err in results]
    for job in ("0", "1", "2"):
        ours, theirs = replicas / job, alone / job
        for row, their_row in zip(epoch_rows(ours), epoch_rows(theirs), strict=True):
            for column, value in row.items():
                assert abs(float(value) - float(their_row[column])) < 0.01, (job, column, value, their_row[column])
        assert _files(ours) == _files(theirs)
        metrics, their_metrics = (json.loads((d / "metrics.json").read_text()) for d in (ours, theirs))
        assert metrics["replicas"] == 3 and metrics["epochs"] == their_metrics["epochs"] == 2
        for key in ("test/loss", "test/iw_nll", "test/active_units"):
            assert abs(metrics[key] - their_metrics[key]) < 0.01, (key, metrics[key], their_metrics[key])
        assert Path(metrics["checkpoint"]).name == Path(their_metrics["checkpoint"]).name
        tensorboard = f"seed={job}"
        assert _scalar_steps(replicas / tensorboard) == _scalar_steps(alone / tensorboard)
    killed = tmp_path / "killed"  # killed in epoch 2, then continued: the uninterrupted sweep's numbers
    kill_early_in_epoch_2([*REPLICA_SWEEP, "hydra/launcher=replicas", data, f"hydra.sweep.dir={killed}"],
                          killed / "0" / "epochs.csv")  # fmt: skip
    continued = run_cli("vae_lightning.train", *REPLICA_SWEEP, "hydra/launcher=replicas", data, "ckpt_path=last",
                        f"hydra.sweep.dir={killed}")  # fmt: skip
    assert continued.returncode == 0, continued.stderr[-3000:]
    for job in ("0", "1", "2"):
        assert epoch_rows(killed / job) == epoch_rows(replicas / job)
        ours, theirs = (json.loads((d / job / "metrics.json").read_text()) for d in (killed, replicas))
        assert ours["test/iw_nll"] == theirs["test/iw_nll"]
    assert "2 groups of jobs with different shapes" in results[3][2] + results[3][1]
    assert all(json.loads((tmp_path / "two" / job / "metrics.json").read_text())["replicas"] == 1 for job in "01")
    refusal = [line for line in results[4][2].splitlines() if line.startswith("error:")]
    assert refusal and "trainer.accumulate_grad_batches" in refusal[0], results[4][2][-2000:]


def test_a_step_vmap_cannot_batch_is_refused_in_one_line():
    """A part whose step torch.func.vmap cannot run (here an objective reading a value to the host)
    is refused at the first step in one line, not a traceback; later errors are not rewritten."""

    class ReadsAValue(OBJECTIVES.get("elbo")):
        def batch(self, model, x, noise, progress):
            if float(x.sum()) < 0:  # data-dependent control flow: vmap refuses .item()
                pass
            return super().batch(model, x, noise, progress)

    built = [_built(PARTS["elbo"], seed) for seed in (0, 1)]
    for module, _ in built:
        module.objective = ReadsAValue(beta=1.0, kl_warmup_epochs=0)
    group = ReplicaGroup([m for m, _ in built], [g for _, g in built])
    with pytest.raises(UserError, match=r"torch.func.vmap cannot run") as err:
        group.train_step(torch.zeros(2, 4, 784), Progress())
    assert "\n" not in str(err.value)


def test_a_net_with_buffers_is_refused_in_one_line():
    """Running statistics (a batch norm's) would have to be stacked and updated under vmap too:
    refused before anything trains."""
    built = [_built(PARTS["elbo"], seed) for seed in (0, 1)]
    for module, _ in built:
        module.model.decoder.register_buffer("running_mean", torch.zeros(3))
    with pytest.raises(UserError, match=r"keeps buffers") as err:
        ReplicaGroup([m for m, _ in built], [g for _, g in built])
    assert "\n" not in str(err.value)
