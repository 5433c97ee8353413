"""Seeds trained as one batched model (training.replicas): each replica is its job alone."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from tests.helpers import epoch_rows, run_cli
from vae_lightning.data.datamodule import MNISTDataModule, binarize
from vae_lightning.data.replica_batches import ReplicaBatches
from vae_lightning.errors import UserError
from vae_lightning.model.objectives import Progress
from vae_lightning.training.module import VAEModule
from vae_lightning.training.replicas import ReplicaGroup, ReplicaNoise, fit, global_generator

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


@pytest.mark.slow
def test_three_seeds_as_replicas_match_their_separate_runs_on_mnist(tmp_path, mnist_dir):
    """Real MNIST, dynamically binarized, 2 epochs of 30 steps: each replica's per-epoch train and
    val means against its own run of the CLI, within 0.01 nats (measured: equal to the 6 digits
    epochs.csv prints)."""
    seeds, args = (0, 1, 2), ["data.binarize=dynamic", "trainer.max_epochs=2", "+trainer.limit_train_batches=30",
                              "+trainer.limit_val_batches=3", "test=false", "eval.k=0"]  # fmt: skip
    modules, generators, datamodules = [], [], []
    for seed in seeds:
        L.seed_everything(seed, verbose=False)
        datamodules.append(MNISTDataModule(data_dir=str(mnist_dir), binarize="dynamic", seed=seed, download=False))
        module, generator = _built({"latent_dim": 20}, seed)
        modules.append(module)
        generators.append(generator)
    group = ReplicaGroup(modules, generators)
    history = fit(group, ReplicaBatches(datamodules, torch.device("cpu")), 2, 30, 3)
    for seed in seeds:
        out = tmp_path / f"seed{seed}"
        result = run_cli("vae_lightning.train", *args, f"seed={seed}", f"data.data_dir={mnist_dir}",
                         f"hydra.run.dir={out}")  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        rows = epoch_rows(out)
        assert len(rows) == 2
        for row, replica in zip(rows, history[seed], strict=True):
            for column, value in row.items():
                if column != "epoch":
                    assert abs(float(value) - replica[column]) < 0.01, (seed, column, value, replica[column])
