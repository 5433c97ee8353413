"""The VAE in plain torch, assembled from parts: an encoder and a decoder (``nets``), a likelihood
(``likelihoods``) and a prior (``priors``). Every consumer (objectives, bound, figures, report,
export) speaks to it through these methods, never through its layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vae_lightning.model.likelihoods import Bernoulli, ContinuousBernoulli, Gaussian, build_likelihood
from vae_lightning.model.nets import IN_PLACE_ACTIVATIONS, build_nets, net_settings
from vae_lightning.model.noise import Noise, standard_normal
from vae_lightning.model.priors import build_prior

INIT_SCHEMES = ("default", "xavier_normal", "normal")
# the reference notebook's net, and what a checkpoint without a net setting was trained with
REFERENCE_NET = {"name": "mlp", "hidden": [400], "activation": "relu"}


class VAE(nn.Module):
    """q(z|x) = N(mu, exp(logvar)) from the encoder, z = mu + exp(logvar / 2) eps, p(x|z) the
    likelihood of the decoder's logits, p(z) the prior. The defaults are the reference notebook's:
    784 -> 400 (ReLU) -> 20 -> 400 (ReLU) -> 784, Bernoulli, N(0, I).

    ``settings`` is the model as plain data (what a checkpoint stores; ``VAE(**settings)`` builds it
    again). The state_dict names layers as the nets do, flat: the reference net's are the notebook's.
    """

    def __init__(
        self,
        net: dict[str, Any] | None = None,
        input_dim: int = 784,
        latent_dim: int = 20,
        init: str = "default",
        init_std: float = 0.01,
        likelihood: str = "bernoulli",
        prior: str = "normal",
        prior_components: int = 500,
    ) -> None:
        super().__init__()
        net = net_settings(REFERENCE_NET if net is None else net)
        self.settings = {"net": net, "input_dim": input_dim, "latent_dim": latent_dim, "init": init,
                         "init_std": init_std, "likelihood": likelihood, "prior": prior,
                         "prior_components": prior_components}  # fmt: skip
        self.input_dim, self.latent_dim = input_dim, latent_dim
        self.encoder, self.decoder = build_nets(net, input_dim, latent_dim)
        init_weights(self, init, init_std)  # the nets' layers; the draws below come after theirs
        self.likelihood = build_likelihood(likelihood, input_dim)
        self.prior = build_prior(prior, input_dim, latent_dim, prior_components)
        layers = [name for part in (self.encoder, self.decoder) for name, _ in part.named_children()]
        if len(set(layers)) != len(layers):
            raise ValueError(f"the {net['name']} net's encoder and decoder share a layer name: {sorted(layers)}")
        self.register_state_dict_post_hook(_flat_names)
        self.register_load_state_dict_pre_hook(_nested_names)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z|x) for images (n, input_dim)."""
        return self.encoder(x)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor, generator: Noise = None) -> Tensor:
        std = torch.exp(0.5 * logvar)  # generator None: the reference notebook's draw, from the global one
        return mu + standard_normal(std.shape, generator, std.device, std.dtype) * std

    def decode_logits(self, z: Tensor) -> Tensor:
        """One logit per pixel for codes z (..., latent_dim)."""
        if z.dim() == 2:
            return self.decoder(z)
        return self.decoder(z.reshape(-1, z.shape[-1])).view(*z.shape[:-1], self.input_dim)

    def decode(self, z: Tensor) -> Tensor:
        """The likelihood's mean: pixel probabilities for the Bernoulli, as the reference notebook's ``decode``."""
        return self.likelihood.mean(self.decode_logits(z))

    def reconstruction_nll(self, logits: Tensor, x: Tensor) -> Tensor:
        """-log p(x | z) per image, summed over pixels, from the decoder's logits (the BCE for the Bernoulli)."""
        return self.likelihood.nll(logits, x)

    def kl(self, mu: Tensor, logvar: Tensor, z: Tensor) -> Tensor:
        """KL(q(z|x) || p(z)) per image: closed-form for N(0, I), else log q(z|x) - log p(z) at ``z``."""
        return self.prior.kl(mu, logvar, z, self.encode)

    def log_prior(self, z: Tensor) -> Tensor:
        """log p(z), summed over latent dimensions."""
        return self.prior.log_prob(z, self.encode)

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws from the prior, on the model's device; the same generator seed gives the same z
        on any device (drawn on the generator's device, then moved)."""
        z = self.prior.sample(n, self.latent_dim, generator, self.encode)
        return z.to(self.device, self.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images decoded from prior draws, as the likelihood's means (n, input_dim)."""
        return self.decode(self.sample_z(n, generator))

    def linear_head(self) -> tuple[list[nn.Linear], str, nn.Linear] | None:
        """(hidden layers, their activation, output layer) when the decoder's logits are a linear map
        of its last hidden layer, as in every MLP: the bound then runs the layers itself, in reused
        buffers, and for a (continuous) Bernoulli needs no k x pixels pass for what is linear in the
        logits (``bound``). None otherwise."""
        layer = getattr(self.decoder, "output_layer", None)
        hidden = getattr(self.decoder, "hidden_layers", None)
        activation = getattr(self.decoder, "activation", None)
        scored = isinstance(self.likelihood, Bernoulli | ContinuousBernoulli | Gaussian)
        plain = isinstance(hidden, list) and all(isinstance(h, nn.Linear) for h in hidden)
        if not isinstance(layer, nn.Linear) or not plain or activation not in IN_PLACE_ACTIVATIONS or not scored:
            return None  # the bound runs the activation itself, in place; any other net decodes
        return hidden, activation, layer

    def page_ops(self) -> list[dict[str, Any]]:
        """The decoder's operations as plain data for the report's in-page decoder (logits out; the
        page applies the likelihood's mean, ``settings["likelihood"]``)."""
        return self.decoder.page_ops()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar


# The state_dict names each layer as the nets do, without the encoder./decoder. it lives in: the
# reference net's keys are the notebook's (fc1.weight, ...), so its weights and older checkpoints
# load as they are, and a checkpoint of the reference net reads as it always has.
def _flat_names(module: VAE, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for part in ("encoder", "decoder"):
        for key in [k for k in state_dict if k.startswith(f"{prefix}{part}.")]:
            state_dict[prefix + key[len(f"{prefix}{part}.") :]] = state_dict.pop(key)


def _nested_names(module: VAE, state_dict: dict, prefix: str, *args: Any) -> None:
    for part in ("encoder", "decoder"):
        for name, _ in getattr(module, part).named_children():
            for key in [k for k in state_dict if k.startswith(f"{prefix}{name}.")]:
                state_dict[f"{prefix}{part}.{key[len(prefix) :]}"] = state_dict.pop(key)


def init_weights(model: nn.Module, scheme: str, std: float = 0.01) -> None:
    """``default`` keeps PyTorch's init; ``xavier_normal`` is a fan-scaled Gaussian;
    ``normal`` is N(0, std) (with std=0.01 it trains markedly slower, see README)."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"model.init={scheme!r} is not one of {', '.join(INIT_SCHEMES)}")
    if scheme == "default":
        return
    for layer in model.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d | nn.ConvTranspose2d):
            if scheme == "xavier_normal":
                nn.init.xavier_normal_(layer.weight)
            else:
                nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)


# what a checkpoint written by main c1154ae or earlier was trained with when it does not say: the
# VAE's defaults of that time, written down once, so that a default changed today does not change
# how an old checkpoint loads
OLD_CHECKPOINT_VAE = {"net": None, "input_dim": 784, "latent_dim": 20, "init": "default", "init_std": 0.01,
                      "likelihood": "bernoulli", "prior": "normal", "prior_components": 500}  # fmt: skip


def vae_settings_from_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's VAE settings, every one of them: its ``vae`` entry, or (checkpoints from before
    nets were parts) the reference net with its old ``hidden_dim``; what it lacks, it was trained
    with as ``OLD_CHECKPOINT_VAE`` says (``net: None`` is the reference net)."""
    defaults = dict(OLD_CHECKPOINT_VAE)
    if isinstance(hparams.get("vae"), dict):
        return {**defaults, **hparams["vae"]}
    settings = {k: hparams[k] for k in ("input_dim", "latent_dim", "init", "init_std") if k in hparams}
    return {**defaults, "net": {**REFERENCE_NET, "hidden": [int(hparams.get("hidden_dim", 400))]}, **settings}
