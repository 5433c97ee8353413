import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vae_lightning.model.likelihoods import bce_from_logits
from vae_lightning.model.objectives import elbo_terms
from vae_lightning.model.priors import kl_divergence
from vae_lightning.model.vae import VAE, init_weights


class ReferenceVAE(nn.Module):
    """The reference notebook's class, as written there (indentation fixed)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc_mu = nn.Linear(400, 20)
        self.fc_logvar = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = torch.relu(self.fc1(x))
        return self.fc_mu(h1), self.fc_logvar(h1)

    def decode(self, z):
        h3 = torch.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))


def test_layer_names_and_shapes():
    model = VAE()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "fc1.weight": (400, 784), "fc1.bias": (400,),
        "fc_mu.weight": (20, 400), "fc_mu.bias": (20,),
        "fc_logvar.weight": (20, 400), "fc_logvar.bias": (20,),
        "fc3.weight": (400, 20), "fc3.bias": (400,),
        "fc4.weight": (784, 400), "fc4.bias": (784,),
    }  # fmt: skip
    x = torch.rand(5, 784)
    recon, mu, logvar = model(x)
    assert recon.shape == (5, 784) and mu.shape == logvar.shape == (5, 20)
    assert ((recon > 0) & (recon < 1)).all()


def test_sizes_are_configurable():
    model = VAE({"hidden": [64]}, latent_dim=2)
    recon, mu, _ = model(torch.rand(3, 784))
    assert mu.shape == (3, 2) and recon.shape == (3, 784) and model.encoder.fc1.out_features == 64


def test_reference_notebook_state_dict_round_trip():
    reference = ReferenceVAE()
    ours = VAE()
    ours.load_state_dict(reference.state_dict())
    x = torch.rand(4, 784)
    mu_s, logvar_s = reference.encode(x)
    mu_o, logvar_o = ours.encode(x)
    torch.testing.assert_close(mu_o, mu_s)
    torch.testing.assert_close(logvar_o, logvar_s)
    torch.testing.assert_close(ours.decode(mu_o), reference.decode(mu_s))
    back = ReferenceVAE()
    back.load_state_dict(ours.state_dict())
    for (k1, v1), (k2, v2) in zip(back.state_dict().items(), reference.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_bce_from_logits_equals_the_reference_formula():
    torch.manual_seed(0)
    x = torch.rand(64, 784)
    # float32, over the logit range a trained model produces
    logits = torch.randn(64, 784) * 2
    reference_bce = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum")
    torch.testing.assert_close(bce_from_logits(logits, x).sum(), reference_bce, rtol=1e-5, atol=0)
    # float64, where the reference notebook's sigmoid does not saturate even for large logits
    logits = torch.randn(64, 784, dtype=torch.float64) * 5
    reference_bce = F.binary_cross_entropy(torch.sigmoid(logits), x.double(), reduction="sum")
    torch.testing.assert_close(bce_from_logits(logits, x.double()).sum(), reference_bce, rtol=1e-9, atol=0)


def test_bce_from_logits_matches_the_library_in_value_and_gradient():
    """The hand-written pixel sum against torch's binary_cross_entropy_with_logits: values in
    float64 to 1e-9, gradients (torch.autograd.gradcheck and the library's) exactly, over logits
    from -100 to 100, for binary and continuous pixels, and for IWAE's expanded images."""
    torch.manual_seed(0)
    logits = (torch.randn(6, 784, dtype=torch.float64) * 30).clamp(-100, 100).requires_grad_()
    for x in (torch.rand(6, 784, dtype=torch.float64).round(), torch.rand(6, 784, dtype=torch.float64)):
        ours = bce_from_logits(logits, x)
        library = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        torch.testing.assert_close(ours, library, rtol=1e-9, atol=1e-9)
        weights = torch.randn(6, dtype=torch.float64)
        (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
        (g_library,) = torch.autograd.grad((library * weights).sum(), logits)
        torch.testing.assert_close(g_ours, g_library, rtol=1e-12, atol=0)
        few = logits[:2, :16].detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda lg, x=x[:2, :16]: bce_from_logits(lg, x), (few,))
    for pixels in (30, 7):  # pixel counts that 8 does not divide: groups of 2, of 1
        odd, x = torch.randn(3, pixels, dtype=torch.float64) * 20, torch.rand(3, pixels, dtype=torch.float64)
        library = F.binary_cross_entropy_with_logits(odd, x, reduction="none").sum(-1)
        torch.testing.assert_close(bce_from_logits(odd, x), library, rtol=1e-9, atol=1e-9)
    expanded = torch.rand(6, 784).round().expand(3, 6, 784)
    logits32 = torch.randn(3, 6, 784) * 4
    torch.testing.assert_close(
        bce_from_logits(logits32, expanded),
        F.binary_cross_entropy_with_logits(logits32, expanded, reduction="none").sum(-1),
        rtol=1e-5, atol=1e-3,
    )  # fmt: skip


def test_bce_from_logits_is_finite_where_sigmoid_saturates():
    logits = torch.tensor([[60.0, -60.0, 200.0]], dtype=torch.bfloat16)
    x = torch.tensor([[0.0, 1.0, 0.5]])
    bce = bce_from_logits(logits, x)
    assert bce.shape == (1,) and bce.dtype == torch.float32 and torch.isfinite(bce)
    assert bce.item() == pytest.approx(60 + 60 + 100, rel=1e-2)  # softplus(l) - x*l


def test_closed_form_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mu = torch.randn(3, 20)
    logvar = torch.randn(3, 20) * 0.5
    closed = kl_divergence(mu, logvar).sum()
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0).sum()
    assert closed.item() == pytest.approx(mc.item(), rel=0.01)
    exact = torch.distributions.kl_divergence(q, p).sum()
    torch.testing.assert_close(closed, exact, rtol=1e-5, atol=1e-4)


def test_gradients_flow_through_reparameterization():
    torch.manual_seed(0)
    model = VAE()
    bce, kl = elbo_terms(model, torch.rand(8, 784))
    assert bce.shape == kl.shape == (8,)
    (bce.sum() + kl.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    mu = torch.zeros(4, 20, requires_grad=True)
    logvar = torch.zeros(4, 20, requires_grad=True)
    VAE.reparameterize(mu, logvar).sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones(4, 20))  # dz/dmu = 1
    assert logvar.grad.abs().sum() > 0  # dz/dlogvar = 0.5 * eps * std


def test_reparameterization_has_the_right_moments():
    torch.manual_seed(0)
    mu = torch.full((100_000, 1), 2.0)
    logvar = torch.full((100_000, 1), math.log(9.0))
    z = VAE.reparameterize(mu, logvar)
    assert z.mean().item() == pytest.approx(2.0, abs=0.05)
    assert z.std().item() == pytest.approx(3.0, rel=0.02)


@pytest.mark.parametrize("scheme", ["xavier_normal", "normal"])
def test_gaussian_inits(scheme):
    torch.manual_seed(0)
    model = VAE(init=scheme, init_std=0.01)
    w = model.encoder.fc1.weight
    expected = math.sqrt(2.0 / (784 + 400)) if scheme == "xavier_normal" else 0.01
    assert w.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(w.mean().item()) < expected / 20
    assert torch.count_nonzero(model.encoder.fc1.bias) == 0


def test_unknown_init_is_rejected():
    with pytest.raises(ValueError, match="model.init='uniform'"):
        init_weights(VAE(), "uniform")
