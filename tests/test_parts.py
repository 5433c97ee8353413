"""Parts that own their behaviour: the objectives added as one file and one config each (free bits,
beta-TCVAE), the terms that key the records, the page's random z from the prior in use, a
likelihood the page cannot draw, and old checkpoints' settings."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from helpers import compose_train

from vae_lightning.data.datamodule import tensor_loader
from vae_lightning.figures.explorer import report_html
from vae_lightning.model.likelihoods import Bernoulli
from vae_lightning.model.objectives import OBJECTIVES, Progress
from vae_lightning.model.objectives.beta_tcvae import total_correlation
from vae_lightning.model.vae import VAE
from vae_lightning.training.callbacks import TrainingHistory
from vae_lightning.training.module import VAEModule, training_settings_from_hparams


def test_free_bits_leaves_every_dimension_below_its_floor_ungraded():
    """With a floor above every dimension's KL, the loss's gradient is the reconstruction's alone;
    with a floor of 0 it is the ELBO's. The logged terms are the true ELBO's either way."""
    torch.manual_seed(0)
    x = torch.rand(16, 784).round()
    grads = {}
    for name, settings in (("floor", {"free_bits": 50.0}), ("zero", {"free_bits": 0.0})):
        torch.manual_seed(1)
        model = VAE(net={"name": "mlp", "hidden": [32]}, latent_dim=4)
        objective = OBJECTIVES.get("free_bits")(**settings)
        loss, terms = objective.batch(model, x, torch.Generator().manual_seed(2), Progress())
        assert torch.allclose(terms["loss"], terms["rec"] + terms["kl"])
        model.zero_grad()
        loss.backward(retain_graph=True)
        grads[name] = model.encoder.fc_logvar.weight.grad.clone()
        model.zero_grad()
        (terms["rec"].sum() + terms["kl"].sum() if name == "zero" else terms["rec"].sum()).backward()
        assert torch.allclose(grads[name], model.encoder.fc_logvar.weight.grad, atol=1e-5)
    assert not torch.allclose(grads["floor"], grads["zero"])


def test_total_correlation_is_zero_for_a_factorised_aggregate_and_large_for_a_correlated_one():
    d, m = 5, 256
    same = torch.zeros(m, d), torch.zeros(m, d)
    z = torch.randn(m, d, generator=torch.Generator().manual_seed(0))
    # every image's posterior the same N(0, I): q(z) factorises, and the batch's estimate is exact
    assert total_correlation(z, *same).abs().max() < 1e-4
    t = torch.randn(m, 1, generator=torch.Generator().manual_seed(1)) * 3
    mu, logvar = t.expand(m, d), torch.full((m, d), math.log(0.01))  # every dimension the same t: correlated
    tc = total_correlation(mu + 0.1 * z, mu, logvar)
    assert tc.mean() > 5


def _fit(module: VAEModule, tmp_path) -> TrainingHistory:
    history = TrainingHistory(output_dir=str(tmp_path))
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=2, callbacks=[history],
    )  # fmt: skip
    x = torch.rand(96, 784, generator=torch.Generator().manual_seed(0)).round()
    trainer.fit(module, tensor_loader(x, 32, True, 0, 0, 1), tensor_loader(x[:64], 32, False, 0, 0, 1))
    return history


def test_beta_tcvae_logs_its_total_correlation_per_step_and_per_epoch(tmp_path):
    torch.manual_seed(0)
    module = VAEModule.from_settings({"name": "mlp", "hidden": [32]}, latent_dim=4, objective="beta_tcvae", tc_beta=6)
    history = _fit(module, tmp_path)
    with (tmp_path / "epochs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train/loss", "train/rec", "train/kl", "train/tc", "val/loss", "val/rec",
                             "val/kl", "val/tc"]  # fmt: skip
    assert len(rows) == 2 and all(math.isfinite(float(row["train/tc"])) for row in rows)
    assert history.step_terms == ("rec", "kl", "loss", "tc") and history.step_values.shape == (6, 4)
    # the loss logged is the ELBO's, whatever tc_beta: rec + KL
    assert float(rows[-1]["val/loss"]) == pytest.approx(float(rows[-1]["val/rec"]) + float(rows[-1]["val/kl"]), 1e-4)


def test_the_new_objectives_compose_from_their_configs_and_refuse_what_they_do_not_read(tmp_path):
    for preset, key in (("free_bits", "free_bits"), ("beta_tcvae", "tc_beta")):
        cfg = compose_train(tmp_path, f"model={preset}")
        assert cfg.model.objective == preset and key in cfg.model
    with pytest.raises(ValueError, match=r"model.beta=0.5 is not read by objective=iwae"):
        VAEModule(objective="iwae", beta=0.5, k=5)
    with pytest.raises(ValueError, match=r"objective=free_bits needs model.free_bits: use model=free_bits"):
        VAEModule(objective="free_bits")
    with pytest.raises(ValueError, match=r"model.tc_beta is not a setting of objective=elbo"):
        VAEModule(objective="elbo", tc_beta=2.0)


def test_old_checkpoints_load_with_the_settings_of_their_time_not_todays():
    # a checkpoint of c1154ae or earlier that says nothing of its training was trained thus
    assert training_settings_from_hparams({"latent_dim": 20}) == {
        "lr": 1e-3, "fused_adam": None, "objective": "elbo", "beta": 1.0, "kl_warmup_epochs": 0,
    }  # fmt: skip
    saved = {"vae": {}, "lr": 3e-4, "fused_adam": None, "objective": "iwae", "beta": 1.0, "kl_warmup_epochs": 0, "k": 5}
    assert training_settings_from_hparams(saved) == {"lr": 3e-4, "fused_adam": None, "objective": "iwae", "k": 5}
    module = VAEModule.from_hparams({**saved, "vae": VAE().settings})
    assert module.objective.name == "iwae" and module.objective.settings == {"k": 5}


def _page(tmp_path, browser, model: VAE):
    test_x, test_y = torch.rand(100, 784), torch.arange(100) % 10
    (tmp_path / "report.html").write_text(report_html(tmp_path, model, test_x, test_y, [str(c) for c in range(10)]))
    page = browser.new_page()
    page.goto((tmp_path / "report.html").as_uri())
    return page


def test_the_pages_random_z_is_a_draw_from_the_prior_in_use(tmp_path, browser):
    torch.manual_seed(0)
    model = VAE(net={"name": "mlp", "hidden": [16]}, latent_dim=3, prior="mog", prior_components=2)
    with torch.no_grad():  # two components far from N(0, I)'s mass, narrow, the second 9 times as likely
        model.prior.means.copy_(torch.tensor([[20.0, 20, 20], [-20, -20, -20]]))
        model.prior.logvars.fill_(math.log(0.01))
        model.prior.logits.copy_(torch.tensor([0.0, math.log(9)]))
    page = _page(tmp_path, browser, model)
    draws = []
    for _ in range(200):
        page.click("#random")
        draws.append(page.evaluate("() => window.explorer.z"))
    draws = torch.tensor(draws)
    near_first = (draws - 20).abs().max(1).values < 1
    near_second = (draws + 20).abs().max(1).values < 1
    assert bool((near_first | near_second).all())  # never N(0, I)'s
    assert 0.03 < near_first.float().mean() < 0.2  # about 1 in 10
    assert "mog (2 components)" in page.locator("#prior-caption").inner_text()
    page.close()


class Unknown(Bernoulli):
    name, page_mean = "unknown", "something_new"


def test_a_likelihood_the_page_cannot_draw_is_said_on_the_page(tmp_path, browser):
    model = VAE(net={"name": "mlp", "hidden": [16]}, latent_dim=2)
    model.likelihood, model.settings["likelihood"] = Unknown(), "unknown"
    page = _page(tmp_path, browser, model)
    assert "cannot draw the unknown likelihood's mean" in page.locator("#decoder-error").inner_text()
    page.click("#test-0")
    assert max(page.evaluate("Array.from(pixels)")) == 0  # drawn blank, not as another likelihood's mean
    page.close()


def test_an_old_checkpoints_model_settings_do_not_follow_todays_defaults(monkeypatch):
    from vae_lightning.model.vae import vae_settings_from_hparams

    defaults = list(VAE.__init__.__defaults__)  # net, input_dim, latent_dim, ...: today's latent_dim is 20
    defaults[2] = 99
    monkeypatch.setattr(VAE.__init__, "__defaults__", tuple(defaults))
    assert VAE(net={"name": "mlp", "hidden": [8]}).latent_dim == 99  # a default changed today...
    assert vae_settings_from_hparams({"vae": {"input_dim": 784}})["latent_dim"] == 20  # ...is not the checkpoint's
    assert vae_settings_from_hparams({"hidden_dim": 400})["likelihood"] == "bernoulli"


def test_a_dataset_no_installed_package_provides_is_one_line_naming_its_group():
    from vae_lightning.data.datasets import SOURCES, source
    from vae_lightning.errors import DataError

    assert list(SOURCES) == ["mnist", "fashion_mnist"] and source("mnist").title == "MNIST"
    with pytest.raises(
        DataError, match=r"data.dataset='kmnist' is not one of mnist, fashion_mnist .*vae_lightning.datasets"
    ):
        source("kmnist")


def test_a_part_is_named_by_the_registry_it_is_registered_in():
    """One source for a part's name: the name it is registered (or installed) under."""
    from vae_lightning.model.likelihoods import Likelihood
    from vae_lightning.registry import Registry

    registry = Registry("likelihood", "model.likelihood")

    @registry.register("made_up")
    class MadeUp(Likelihood):
        pass

    assert registry.get("made_up").name == "made_up" and Bernoulli.name == "bernoulli"
