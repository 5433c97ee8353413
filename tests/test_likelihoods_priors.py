"""Likelihoods and priors as parts: each against torch.distributions, the Monte-Carlo KL against the
closed form, every likelihood x prior trained a few steps on real MNIST with its bound checked
against float64, and one such model through the CLI, the report (Chromium) and export."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import brief_run
from test_report import canvas, open_report, python_decode

from vae_lightning.data.datasets import load_split
from vae_lightning.export import export
from vae_lightning.model.bound import iw_log_likelihood
from vae_lightning.model.likelihoods import LIKELIHOODS, ContinuousBernoulli, Gaussian
from vae_lightning.model.objectives import elbo_terms, iwae_terms
from vae_lightning.model.priors import (
    PRIORS,
    gaussian_log_density,
    kl_divergence,
    mixture_log_density,
    standard_normal_log_density,
)
from vae_lightning.model.vae import VAE
from vae_lightning.names import current_name
from vae_lightning.runs.building import module_from_checkpoint
from vae_lightning.training.module import VAEModule

D = torch.distributions


def test_continuous_bernoulli_and_gaussian_match_torch_distributions():
    logits = torch.tensor([[-6.0, -1.0, -1e-4, 0.0, 2e-4, 0.7, 9.0]], dtype=torch.float64)
    x = torch.tensor([[0.0, 0.2, 0.5, 0.9, 1.0, 0.33, 0.7]], dtype=torch.float64)
    cb = ContinuousBernoulli()
    want = -D.ContinuousBernoulli(logits=logits).log_prob(x).sum(-1)
    torch.testing.assert_close(cb.nll(logits, x), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(cb.mean(logits), D.ContinuousBernoulli(logits=logits).mean, rtol=0, atol=1e-6)
    gaussian = Gaussian(7)
    with torch.no_grad():
        gaussian.log_var.copy_(torch.linspace(-3, 1, 7))
    want = -D.Normal(torch.sigmoid(logits), torch.exp(0.5 * gaussian.log_var.double())).log_prob(x).sum(-1)
    torch.testing.assert_close(gaussian.nll(logits, x).double(), want, rtol=0, atol=1e-5)


def test_the_continuous_bernoulli_gradient_is_its_derivative_and_accurate_in_fp32():
    """Its gradient is written by hand (likelihoods._PixelSummedNLL): gradcheck against finite
    differences in fp64, across the series' seam and from l ~ 1e-7 to 100; in fp32 within 1e-6 of
    fp64, where autograd through l / tanh(l / 2) was off by up to 1e-4 near l = 0."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-7, 1e-3, 0.04, 0.06, 0.3, 0.49, 0.51, 2.0, 20.0, 100.0], dtype=torch.float64)
    logits = (torch.randn(10, 64, generator=gen, dtype=torch.float64) * scales[:, None]).requires_grad_()
    x = torch.rand(10, 64, generator=gen, dtype=torch.float64)
    cb = ContinuousBernoulli()
    assert torch.autograd.gradcheck(lambda logit: cb.nll(logit, x), (logits,))
    (exact,) = torch.autograd.grad(cb.nll(logits, x).sum(), logits)
    single = logits.detach().float().requires_grad_()
    (grad,) = torch.autograd.grad(cb.nll(single, x.float()).sum(), single)
    torch.testing.assert_close(grad.double(), exact, rtol=0, atol=1e-6)


def test_the_monte_carlo_kl_estimate_agrees_with_the_closed_form_on_the_standard_normal():
    gen = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen) * 0.5
    z = mu + torch.exp(0.5 * logvar) * torch.randn(200_000, 4, 6, generator=gen)
    estimate = (gaussian_log_density(z, mu, logvar) - standard_normal_log_density(z)).mean(0)
    torch.testing.assert_close(estimate, kl_divergence(mu, logvar), rtol=0, atol=0.03)


def test_the_mixture_density_matches_torch_in_float64():
    gen = torch.Generator().manual_seed(1)
    means, logvars = torch.randn(7, 3, generator=gen), torch.randn(7, 3, generator=gen) * 0.3
    logits = torch.randn(7, generator=gen)
    z = torch.randn(5, 11, 3, generator=gen) * 2
    mixture = D.MixtureSameFamily(
        D.Categorical(logits=logits.double()),
        D.Independent(D.Normal(means.double(), torch.exp(0.5 * logvars.double())), 1),
    )
    got = mixture_log_density(z, means, logvars, torch.log_softmax(logits, 0), rows=8)
    torch.testing.assert_close(got.double(), mixture.log_prob(z.double()), rtol=0, atol=1e-4)


def float64_bound(vae: VAE, x: torch.Tensor, k: int, seed: int, chunks: int) -> torch.Tensor:
    """log 1/k sum_i p(x, z_i) / q(z_i | x) from the textbook densities in float64, with the draws
    iw_log_likelihood makes (``chunks`` equal chunks of z)."""
    vae = vae.double()
    noise = torch.Generator().manual_seed(seed)
    eps = torch.cat([torch.randn(k // chunks, *x.shape[:1], vae.latent_dim, generator=noise) for _ in range(chunks)])
    with torch.no_grad():
        mu, logvar = vae.encode(x.double())
        z = mu + eps.double() * torch.exp(0.5 * logvar)
        log_w = -vae.reconstruction_nll(vae.decode_logits(z), x.double()) + vae.log_prior(z)
        log_w = log_w - D.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    return torch.logsumexp(log_w, 0) - math.log(k)


@pytest.fixture(scope="module")
def mnist_batches(mnist_dir):
    images = load_split(mnist_dir, train=True)[0]
    return images[:640].split(64)


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_every_likelihood_and_prior_trains_on_mnist_and_bounds_as_float64_does(likelihood, prior, mnist_batches):
    torch.manual_seed(0)
    module = VAEModule.from_settings(
        {"hidden": [64]}, latent_dim=4, likelihood=likelihood, prior=prior, prior_components=10
    )
    vae, optimizer = module.model, torch.optim.Adam(module.parameters(), lr=1e-3)
    before = None
    for step, x in enumerate(mnist_batches):  # 10 steps of the ELBO, then of IWAE (k = 3)
        rec, kl = elbo_terms(vae, x) if step < 5 else iwae_terms(vae, x, 3)[:2]
        loss = (rec + kl).sum()
        assert torch.isfinite(loss) and rec.shape == kl.shape == (64,)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        before = before if before is not None else loss.item()
    assert loss.item() < before  # it learns
    vae.eval()
    x = mnist_batches[0][:6]
    got = iw_log_likelihood(vae, x, 40, chunk_rows=60, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, float64_bound(vae, x, 40, 5, chunks=4), rtol=0, atol=2e-3)
    samples = vae.float().sample(5, torch.Generator().manual_seed(0))
    assert samples.shape == (5, 784) and (0 <= samples).all() and (samples <= 1).all()


def test_older_metric_names_read_as_todays():
    assert current_name("train/bce") == "train/rec" and current_name("train/bce_step") == "train/rec_step"
    assert current_name("test/bce") == "test/rec" and current_name("val/kl") == "val/kl"
    assert current_name("epoch") == "epoch"


@pytest.mark.slow
def test_a_vampprior_with_a_continuous_bernoulli_through_the_cli_report_and_export(mnist_dir, tmp_path, browser):
    metrics = brief_run(
        tmp_path, mnist_dir, "model.likelihood=continuous_bernoulli", "model.prior=vamp", "model.prior_components=50",
        "eval.k=5", batches=20,
    )  # fmt: skip
    assert math.isfinite(metrics["test/iw_nll"]) and {"test/rec", "test/kl"} <= set(metrics)
    assert "under the continuous bernoulli, a density on [0, 1] per pixel" in metrics["note"]
    assert (tmp_path / "lambda_and_mean.png").is_file()  # its lambda beside its washed-out mean
    assert "alt='lambda_and_mean'" in (tmp_path / "report.html").read_text()
    page, _, errors, _ = open_report(browser, tmp_path)
    z = np.random.default_rng(0).standard_normal(20).round(3).tolist()
    page.goto((tmp_path / "report.html").as_uri() + "#z=" + ",".join(map(str, z)))
    page.reload()
    assert np.abs(canvas(page) - python_decode(tmp_path, z)).max() <= 1.0  # the continuous Bernoulli's mean
    page.check("#show-lambda")  # its parameter instead, as the paper's images show it
    vae = module_from_checkpoint(sorted((tmp_path / "checkpoints").glob("epoch_*.ckpt"))[0]).model.eval()
    with torch.no_grad():
        lam = torch.sigmoid(vae.decode_logits(torch.tensor([z]))).view(28, 28).numpy() * 255
    assert np.abs(canvas(page) - lam).max() <= 1.0 and np.abs(lam - python_decode(tmp_path, z)).max() > 10
    page.close()
    assert errors == []
    from safetensors.torch import load_file

    from vae_lightning.training.checkpoints import find_checkpoint

    vae = module_from_checkpoint(find_checkpoint(tmp_path, "best")).model.eval()
    export(vae, tmp_path / "st", "safetensors")
    fresh = VAE(**json.loads((tmp_path / "st" / "vae.json").read_text()))
    fresh.load_state_dict({k: v for f in ("encoder", "decoder", "prior") for k, v in
                           load_file(tmp_path / "st" / f"{f}.safetensors").items()})  # fmt: skip
    zs = torch.randn(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(fresh.decode(zs), vae.decode(zs))
        torch.testing.assert_close(fresh.log_prior(zs), vae.log_prior(zs))
