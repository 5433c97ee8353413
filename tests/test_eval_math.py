"""The importance-weighted bound and active units on tiny models with known answers."""

import copy
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vae_lightning.figures.plots import latent_scatter
from vae_lightning.model.bound import active_units, iw_log_likelihood
from vae_lightning.model.objectives import elbo_terms
from vae_lightning.model.vae import VAE
from vae_lightning.training.checkpoints import load_checkpoint


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = VAE({"hidden": [16]}, latent_dim=3)
    x = torch.rand(6, 784).round()
    return model, x


def test_k1_bound_is_the_elbo_in_expectation(tiny):
    model, x = tiny
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([iw_log_likelihood(model, x, 1, generator=gen) for _ in range(4000)])
    with torch.no_grad():
        torch.manual_seed(2)
        elbo = torch.stack([-sum(elbo_terms(model, x)) for _ in range(4000)]).double()
    # same expectation; compare means with a tolerance of a few standard errors
    se = (draws.std(0) / math.sqrt(4000) + elbo.std(0) / math.sqrt(4000)).max().item()
    assert (draws.mean(0) - elbo.mean(0)).abs().max().item() < 5 * se


def test_bound_tightens_with_k(tiny):
    model, x = tiny
    gen = torch.Generator().manual_seed(0)
    bounds = [
        torch.stack([iw_log_likelihood(model, x, k, generator=gen) for _ in range(30)]).mean(0) for k in (1, 10, 100)
    ]
    assert (bounds[1] > bounds[0]).all() and (bounds[2] > bounds[1]).all()


def test_chunking_does_not_change_the_estimate(tiny):
    model, x = tiny
    # k = 3000 for 6 images: one pass of 18000 rows, or 1000 passes of 3 samples each
    whole = iw_log_likelihood(model, x, 3000, chunk_rows=100_000, generator=torch.Generator().manual_seed(5))
    chunked = iw_log_likelihood(model, x, 3000, chunk_rows=18, generator=torch.Generator().manual_seed(6))
    other = iw_log_likelihood(model, x, 3000, chunk_rows=100_000, generator=torch.Generator().manual_seed(7))
    # chunking changes nothing but the draws: the gap is Monte-Carlo noise, as between two seeds
    assert (whole - chunked).abs().max() < 3 * (whole - other).abs().max() + 1e-3


def test_bound_is_the_textbook_formula_in_float64():
    """The bound's fast arithmetic (softplus split into |l| and sigmoid products, the linear
    terms through the hidden layer) against the definition, term by term in float64, on the
    same draws; logits up to about +-60 and both binary and continuous pixels."""
    torch.manual_seed(0)
    model = VAE({"hidden": [64]}, latent_dim=5)
    with torch.no_grad():
        model.decoder.fc4.weight.mul_(20.0)
    x = torch.cat([torch.rand(4, 784).round(), torch.rand(4, 784)])
    k = 200
    fast = iw_log_likelihood(model, x, k, chunk_rows=10**6, generator=torch.Generator().manual_seed(3))
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        mu, logvar = (t.double() for t in model.encode(x))  # the function's own encoder pass, in fp32
        eps = torch.randn(k, *mu.shape, generator=torch.Generator().manual_seed(3)).double()  # one chunk: its draws
        z = mu + eps * torch.exp(0.5 * logvar)
        logits = m.decode_logits(z)
        assert logits.abs().max() > 40
        log_px = (x.double() * logits - torch.nn.functional.softplus(logits)).sum(-1)
        normal = torch.distributions.Normal
        log_pz = normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
        textbook = torch.logsumexp(log_px + log_pz - log_qz, dim=0) - math.log(k)
    torch.testing.assert_close(fast, textbook, rtol=0, atol=2e-3)


def prior_posterior_constant_decoder(logit: float) -> VAE:
    """q(z|x) = N(0, I) = p(z) for every x, and every pixel's logit is ``logit`` whatever z."""
    model = VAE({"hidden": [8]}, latent_dim=2)
    with torch.no_grad():
        for layer in (model.encoder.fc_mu, model.encoder.fc_logvar, model.decoder.fc3):
            layer.weight.zero_()
            layer.bias.zero_()
        model.decoder.fc4.weight.zero_()
        model.decoder.fc4.bias.fill_(logit)
    return model


def test_exact_when_the_posterior_is_exact():
    """With q(z|x) = p(z) and a decoder that ignores z, p(x,z)/q(z|x) = p(x|z) is constant, so
    the bound equals log p(x) for every k, even k = 1."""
    model = prior_posterior_constant_decoder(0.3)
    x = torch.rand(3, 784)
    exact = (x * 0.3 - torch.nn.functional.softplus(torch.tensor(0.3))).sum(-1).double()
    for k in (1, 7, 300):
        torch.testing.assert_close(iw_log_likelihood(model, x, k), exact, rtol=1e-6, atol=1e-4)


def test_logsumexp_is_stable_for_extreme_weights():
    """log w around -1e5 would underflow exp() in any precision; the bound must stay finite
    and equal the analytic value."""
    model = prior_posterior_constant_decoder(150.0)  # every pixel ~1: x = 0 costs ~150 nats a pixel
    x = torch.zeros(2, 784)
    value = iw_log_likelihood(model, x, 50)
    assert torch.isfinite(value).all()
    torch.testing.assert_close(value, torch.full((2,), -784 * 150.0, dtype=torch.float64), rtol=1e-6, atol=1e-3)


def test_active_units_count_a_constructed_encoder():
    torch.manual_seed(0)
    mu = torch.zeros(1000, 5)
    mu[:, 0] = torch.randn(1000)  # variance 1: active
    mu[:, 1] = 0.5 * torch.randn(1000)  # variance 0.25: active
    mu[:, 2] = 0.05 * torch.randn(1000)  # variance 0.0025: inactive
    mu[:, 3] = 3.0  # constant: inactive
    assert active_units(mu) == 2
    assert active_units(mu, threshold=0.001) == 3


@pytest.mark.parametrize("latent_dim", [1, 2, 5])
def test_the_latent_scatter_is_drawn_for_any_latent_size(latent_dim):
    labels = torch.arange(200) % 10
    mu = torch.randn(200, latent_dim) + labels.unsqueeze(1)
    points = latent_scatter(mu, labels, [str(c) for c in range(10)], "digit").axes[0].collections[0].get_offsets()
    assert points.shape == (200, 2) and np.isfinite(points).all()


def test_principal_directions_are_the_svds_and_stay_cheap_for_a_huge_latent_space(monkeypatch):
    from vae_lightning.figures import pca

    g = torch.Generator().manual_seed(0)
    points = torch.randn(3000, 3, generator=g) * torch.tensor([30.0, 20.0, 10.0]) @ torch.randn(3, 2000, generator=g)
    points += 0.01 * torch.randn(3000, 2000, generator=g)
    mean, s, v, total = pca.principal_directions(points.double(), 3)  # 2,000 dimensions: exact
    _, s_exact, v_exact = torch.linalg.svd(points.double() - points.double().mean(0), full_matrices=False)
    assert torch.allclose(s, s_exact[:3], rtol=1e-10)
    assert torch.allclose((v @ v_exact[:3].T).abs(), torch.eye(3, dtype=torch.float64), atol=1e-8)  # up to sign
    assert float(total) == pytest.approx(float((s_exact**2).sum()), rel=1e-12)
    monkeypatch.setattr(pca, "EXACT_UP_TO", 1000)  # the randomized SVD, on the same points
    _, s_fast, v_fast, _ = pca.principal_directions(points.double(), 3)
    assert torch.allclose((v_fast @ v_exact[:3].T).abs(), torch.eye(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(s_fast, s_exact[:3], rtol=1e-6)
    assert torch.equal(pca.principal_directions(points.double(), 3)[2], v_fast)  # its own seed: the same every time

    # 10,000 test images in 10,000 dimensions (a latent_dim=10000 run), 3 strong directions: found
    strong = torch.linalg.qr(torch.randn(10_000, 3, generator=g))[0].T
    points = torch.randn(10_000, 3, generator=g) * torch.tensor([30.0, 20.0, 10.0]) @ strong
    points += 0.01 * torch.randn(10_000, 10_000, generator=g)
    _, _, v, _ = pca.principal_directions(points, 3)  # the exact SVD would take minutes
    assert torch.allclose((v @ strong.T).norm(dim=1), torch.ones(3), atol=1e-3)  # within their span


def test_a_long_bound_stopped_midway_continues_where_it_was_and_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from vae_lightning.training import evaluation
    from vae_lightning.training.evaluation import Evaluation

    torch.manual_seed(0)
    model = VAE({"hidden": [16]}, latent_dim=3).eval()
    x = torch.rand(10, 784).round()
    trainer = SimpleNamespace(received_sigterm=False, callbacks=[])
    whole, whole_mu = Evaluation(str(tmp_path / "whole"), k=1000, batch_size=3).bound(model, x, trainer)
    calls, real, run = [], evaluation.iw_log_likelihood, tmp_path / "run"

    def counted(model, xb, *args):
        calls.append(len(xb))
        trainer.received_sigterm = stopping and len(calls) == 2  # a stop signal during the second batch
        return real(model, xb, *args)

    evaluations = []  # every bound_of's: the last one's seconds are read below

    def bound_of(model, stop: bool, out: Path = run, progress_dir: Path | None = None):
        nonlocal stopping
        calls.clear()
        trainer.received_sigterm, stopping = False, stop
        kept = str(progress_dir) if progress_dir else None
        evaluations.append(Evaluation(str(out), k=1000, batch_size=3, progress_dir=kept))
        return evaluations[-1].bound(model, x, trainer)

    stopping = False
    monkeypatch.setattr(evaluation, "iw_log_likelihood", counted)
    with pytest.raises(SIGTERMException):
        bound_of(model, stop=True)
    assert calls == [3, 3] and len(list(run.glob("bound_progress_*.pt"))) == 1
    (kept,) = run.glob("bound_progress_*.pt")
    state = load_checkpoint(kept)
    assert state["seconds"] > 0
    torch.save({**state, "seconds": 1e6}, kept)  # as if the stopped pass had taken 10^6 s

    continued, mu = bound_of(model, stop=False)
    assert calls == [3, 1]  # only the images the stopped pass had not done
    assert continued == whole and torch.equal(mu, whole_mu)  # the same noise, continued: the same number
    assert evaluations[-1].seconds > 1e6  # its time counts the stopped pass's
    assert not list(run.glob("bound_progress_*"))

    # an eval keeps its progress outside its own new dir, so the next eval of the same weights continues it
    shared = tmp_path / "unfinished_bounds"
    with pytest.raises(SIGTERMException):
        bound_of(model, stop=True, out=tmp_path / "eval_1", progress_dir=shared)
    continued, _ = bound_of(model, stop=False, out=tmp_path / "eval_2", progress_dir=shared)
    assert calls == [3, 1] and continued == whole and not list(shared.iterdir())

    # a progress file that is damaged, or holds what the safe loader refuses, is not used
    for junk in (b"not a checkpoint", pickle.dumps(SimpleNamespace(key="x"), protocol=2)):
        with pytest.raises(SIGTERMException):
            bound_of(model, stop=True)
        (saved,) = run.glob("bound_progress_*.pt")
        saved.write_bytes(junk)
        assert bound_of(model, stop=False)[0] == whole and calls == [3, 3, 3, 1]

    with pytest.raises(SIGTERMException):
        bound_of(model, stop=True)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    bound_of(model, stop=False)
    assert calls == [3, 3, 3, 1]  # other weights' progress is not used
    assert len(list(run.glob("bound_progress_*.pt"))) == 1  # and is kept, for the weights it belongs to
