"""p(z) (``model.prior``): the standard normal (the reference notebook's, with its closed-form KL),
a learned mixture of Gaussians, and the VampPrior (Tomczak & Welling 2018), a mixture of the
encoder's posteriors at learned pseudo-inputs. Where no closed form exists, the KL logged and
trained is the one-sample Monte-Carlo estimate log q(z|x) - log p(z) at the z the reconstruction used.

Each is a ``Prior`` in the ``PRIORS`` registry (installed plugins add theirs), built as
``cls(input_dim, latent_dim, components)``; it carries its KL, log-density and sampler, and the
Gaussian mixture the report's page draws its random z from (``page_mixture``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from vae_lightning.model.likelihoods import at_least_fp32
from vae_lightning.registry import Registry

LOG_2PI = math.log(2 * math.pi)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """Per-image closed-form KL(N(mu, exp(logvar)) || N(0, I)), at least fp32.
    Kingma & Welling 2014, appendix B: -1/2 sum(1 + log sigma^2 - mu^2 - sigma^2)."""
    mu, logvar = at_least_fp32(mu), at_least_fp32(logvar)
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def standard_normal_log_density(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * z.pow(2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def gaussian_log_density(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, exp(logvar)), summed over the last dimension, at least fp32."""
    z, mu, logvar = at_least_fp32(z), at_least_fp32(mu), at_least_fp32(logvar)
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def mixture_log_density(z: Tensor, means: Tensor, logvars: Tensor, log_weights: Tensor, rows: int = 4096) -> Tensor:
    """log sum_k w_k N(z; m_k, diag(exp(logvar_k))) for z (..., d) and K components (K, d), in fp32+.
    The squared distances to every component are one matrix product, z^2 . (1/v) - 2 z . (m/v) +
    m^2 . (1/v), taken ``rows`` z at a time so that memory stays (rows, K) whatever the batch."""
    shape, d = z.shape[:-1], z.shape[-1]
    z = at_least_fp32(z).reshape(-1, d)
    means, logvars = at_least_fp32(means), at_least_fp32(logvars)
    precision = torch.exp(-logvars)  # (K, d)
    const = (means.pow(2) * precision).sum(-1) + logvars.sum(-1) + d * LOG_2PI  # (K,)
    out = []
    for block in z.split(rows):
        squared = block.pow(2) @ precision.T - 2 * block @ (means * precision).T + const  # (rows, K)
        out.append(torch.logsumexp(log_weights - 0.5 * squared, dim=-1))
    return torch.cat(out).view(shape)


class Prior(nn.Module):
    """p(z). Its ``name`` is the one it is registered under (the registry sets it); a
    subclass sets ``closed_form`` (``kl`` is exact, not estimated at z) and
    defines ``kl`` (per image), ``log_prob`` (summed over latent dimensions), ``sample`` (n draws,
    on the generator's device) and ``page_mixture``; ``encode`` is the VAE's, for priors made of
    the encoder's posteriors. ``uses_components``: ``model.prior_components`` sizes it."""

    name: str = ""
    closed_form: bool = False
    uses_components: bool = False

    def __init__(self, input_dim: int, latent_dim: int, components: int) -> None:
        super().__init__()
        if self.uses_components and not (isinstance(components, int) and components >= 1):
            raise ValueError(f"model.prior_components={components!r} must be an integer >= 1")

    def kl(self, mu: Tensor, logvar: Tensor, z: Tensor, encode: Callable) -> Tensor:
        return gaussian_log_density(z, mu, logvar) - self.log_prob(z, encode)

    def log_prob(self, z: Tensor, encode: Callable) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, latent_dim: int, generator: torch.Generator | None, encode: Callable) -> Tensor:
        raise NotImplementedError

    def page_mixture(self, latent_dim: int, encode: Callable) -> tuple[Tensor, Tensor, Tensor]:
        """p(z) as the Gaussian mixture the report's page samples its random z from: (means (K, d),
        log-variances (K, d), log-weights (K,)). A prior that is no such mixture raises
        NotImplementedError, and the page then offers no random z."""
        raise NotImplementedError


PRIORS: Registry[type[Prior]] = Registry("prior", "model.prior")


@PRIORS.register("normal")
class StandardNormal(Prior):
    """p(z) = N(0, I). Its KL from q(z|x) is closed-form (``kl_divergence``)."""

    closed_form = True

    def kl(self, mu: Tensor, logvar: Tensor, z: Tensor, encode: Callable) -> Tensor:
        return kl_divergence(mu, logvar)

    def log_prob(self, z: Tensor, encode: Callable) -> Tensor:
        return standard_normal_log_density(z)

    def sample(self, n: int, latent_dim: int, generator: torch.Generator | None, encode: Callable) -> Tensor:
        device = generator.device if generator is not None else None
        return torch.randn(n, latent_dim, generator=generator, device=device)

    def page_mixture(self, latent_dim: int, encode: Callable) -> tuple[Tensor, Tensor, Tensor]:
        return torch.zeros(1, latent_dim), torch.zeros(1, latent_dim), torch.zeros(1)


@PRIORS.register("mog")
class MixtureOfGaussians(Prior):
    """p(z) = sum_k pi_k N(mu_k, diag(sigma_k^2)): K learned components (means drawn N(0, I), unit
    variances and equal weights at the start)."""

    uses_components = True

    def __init__(self, input_dim: int, latent_dim: int, components: int) -> None:
        super().__init__(input_dim, latent_dim, components)
        self.means = nn.Parameter(torch.randn(components, latent_dim))
        self.logvars = nn.Parameter(torch.zeros(components, latent_dim))
        self.logits = nn.Parameter(torch.zeros(components))

    def log_prob(self, z: Tensor, encode: Callable) -> Tensor:
        return mixture_log_density(z, self.means, self.logvars, torch.log_softmax(self.logits.float(), 0))

    def sample(self, n: int, latent_dim: int, generator: torch.Generator | None, encode: Callable) -> Tensor:
        device = generator.device if generator is not None else self.means.device
        probs = torch.softmax(self.logits.detach().float(), 0).to(device)
        k = torch.multinomial(probs, n, replacement=True, generator=generator)
        eps = torch.randn(n, latent_dim, generator=generator, device=device)
        means, logvars = self.means.detach().float().to(device), self.logvars.detach().float().to(device)
        return means[k] + torch.exp(0.5 * logvars[k]) * eps

    def page_mixture(self, latent_dim: int, encode: Callable) -> tuple[Tensor, Tensor, Tensor]:
        return self.means.detach(), self.logvars.detach(), torch.log_softmax(self.logits.detach().float(), 0)


@PRIORS.register("vamp")
class VampPrior(Prior):
    """p(z) = 1/K sum_k q(z | u_k) for K learned pseudo-inputs u_k (Tomczak & Welling 2018), each a
    learned image through hardtanh(0, 1), started at N(0.05, 0.01) per pixel as in the paper's code."""

    uses_components = True

    def __init__(self, input_dim: int, latent_dim: int, components: int) -> None:
        super().__init__(input_dim, latent_dim, components)
        self.raw_inputs = nn.Parameter(torch.empty(components, input_dim).normal_(0.05, 0.01))

    def pseudo_inputs(self) -> Tensor:
        return nn.functional.hardtanh(self.raw_inputs, 0.0, 1.0)

    def log_prob(self, z: Tensor, encode: Callable) -> Tensor:
        means, logvars = encode(self.pseudo_inputs())
        log_weights = torch.full((len(means),), -math.log(len(means)), device=z.device)
        return mixture_log_density(z, means, logvars, log_weights)

    @torch.no_grad()
    def sample(self, n: int, latent_dim: int, generator: torch.Generator | None, encode: Callable) -> Tensor:
        device = generator.device if generator is not None else self.raw_inputs.device
        means, logvars = (t.float().to(device) for t in encode(self.pseudo_inputs()))
        k = torch.randint(len(means), (n,), generator=generator, device=device)
        eps = torch.randn(n, latent_dim, generator=generator, device=device)
        return means[k] + torch.exp(0.5 * logvars[k]) * eps

    @torch.no_grad()
    def page_mixture(self, latent_dim: int, encode: Callable) -> tuple[Tensor, Tensor, Tensor]:
        means, logvars = encode(self.pseudo_inputs())
        return means, logvars, torch.full((len(means),), -math.log(len(means)))


def build_prior(name: str, input_dim: int, latent_dim: int, components: int) -> Prior:
    return PRIORS.get(name)(input_dim, latent_dim, components)
