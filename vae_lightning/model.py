"""The seed's VAE in plain torch: model, ELBO terms, importance-weighted bound."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INIT_SCHEMES = ("default", "xavier_normal", "normal")


class VAE(nn.Module):
    """784 -> 400 (ReLU) -> (mu, logvar) in R^20; 20 -> 400 (ReLU) -> 784 (sigmoid).

    Layer names match the seed notebook's class, so its state_dict loads as is.
    """

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dim: int = 400,
        latent_dim: int = 20,
        init: str = "default",
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.input_dim, self.hidden_dim, self.latent_dim = input_dim, hidden_dim, latent_dim
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)
        self.fc3 = nn.Linear(latent_dim, hidden_dim)
        self.fc4 = nn.Linear(hidden_dim, input_dim)
        init_weights(self, init, init_std)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h1 = torch.relu(self.fc1(x))
        return self.fc_mu(h1), self.fc_logvar(h1)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        std = torch.exp(0.5 * logvar)
        return mu + torch.randn_like(std) * std

    def decode_logits(self, z: Tensor) -> Tensor:
        return self.fc4(torch.relu(self.fc3(z)))

    def decode(self, z: Tensor) -> Tensor:
        """Pixel probabilities, as the seed's ``decode``."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar


def init_weights(model: nn.Module, scheme: str, std: float = 0.01) -> None:
    """``default`` keeps PyTorch's init; ``xavier_normal`` is a fan-scaled Gaussian;
    ``normal`` is N(0, std) (with std=0.01 it trains markedly slower, see README)."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"model.init={scheme!r} is not one of {', '.join(INIT_SCHEMES)}")
    if scheme == "default":
        return
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            if scheme == "xavier_normal":
                nn.init.xavier_normal_(layer.weight)
            else:
                nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)


def _at_least_fp32(t: Tensor) -> Tensor:
    # under autocast the layers run in fp16/bf16; the sums over 784 pixels must not
    return t.to(torch.promote_types(t.dtype, torch.float32))


def bce_from_logits(logits: Tensor, x: Tensor) -> Tensor:
    """Per-image BCE of sigmoid(logits) against x, summed over pixels; at least fp32 and
    stable for any logit. ``.sum()`` of it is the seed's ``binary_cross_entropy(..., "sum")``."""
    logits = _at_least_fp32(logits)
    return F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype), reduction="none").sum(-1)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """Per-image closed-form KL(N(mu, exp(logvar)) || N(0, I)), at least fp32."""
    mu, logvar = _at_least_fp32(mu), _at_least_fp32(logvar)
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def elbo_terms(model: VAE, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image (BCE, KL) of one reparameterised pass; the seed's loss is their total sum."""
    mu, logvar = model.encode(x)
    logits = model.decode_logits(model.reparameterize(mu, logvar))
    return bce_from_logits(logits, x), kl_divergence(mu, logvar)
