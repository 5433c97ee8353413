"""Encoder and decoder nets, each a part the VAE is assembled from (``model/net=...``).

An encoder maps images (n, input_dim) in [0, 1] to q(z|x)'s (mu, logvar), each (n, latent_dim); a
decoder maps z (n, latent_dim) to one logit per pixel (n, input_dim). A decoder also lists its
operations as plain data (``page_ops``), so that the report's in-page decoder can run it.

Nets are chosen by name (``NETS``, a registry that installed plugins add to), never by an import
path: a checkpoint names its net, and a file must not be able to name code to run. Adding a net is
one class pair registered as a ``NetPair`` and one config in ``conf/model/net/`` (docs/models.md);
a plugin's, the same in its own package (docs/plugins.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vae_lightning.registry import Registry

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}
# the same, in place: what the bound's fast path runs on its reused buffers (``model.linear_head``)
IN_PLACE_ACTIVATIONS = {"relu": torch.Tensor.relu_, "tanh": torch.Tensor.tanh_}


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"model.net.activation={name!r} is not one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLPEncoder(nn.Module):
    """input_dim -> hidden... (activation) -> (mu, logvar). With ``hidden=[400]`` and ReLU it is the
    reference notebook's encoder, with its layer names: fc1, fc_mu, fc_logvar."""

    def __init__(self, input_dim: int, latent_dim: int, hidden: Sequence[int] = (400,), activation: str = "relu"):
        super().__init__()
        self.act, self.names = _activation(activation), [f"fc{i + 1}" for i in range(len(hidden))]
        sizes = [input_dim, *hidden]
        for name, n_in, n_out in zip(self.names, sizes, sizes[1:], strict=False):
            self.add_module(name, nn.Linear(n_in, n_out))
        self.fc_mu = nn.Linear(sizes[-1], latent_dim)
        self.fc_logvar = nn.Linear(sizes[-1], latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = x
        for name in self.names:
            h = self.act(getattr(self, name)(h))
        return self.fc_mu(h), self.fc_logvar(h)


class MLPDecoder(nn.Module):
    """latent_dim -> hidden... (activation) -> input_dim logits. Layer numbers continue the
    encoder's (fc2 being the mu/logvar pair), so ``hidden=[400]`` is the notebook's fc3, fc4."""

    def __init__(self, input_dim: int, latent_dim: int, hidden: Sequence[int] = (400,), activation: str = "relu"):
        super().__init__()
        self.activation, self.act = activation, _activation(activation)
        first = len(hidden) + 2
        self.names = [f"fc{first + i}" for i in range(len(hidden))]
        sizes = [latent_dim, *reversed(list(hidden))]
        for name, n_in, n_out in zip(self.names, sizes, sizes[1:], strict=False):
            self.add_module(name, nn.Linear(n_in, n_out))
        self.out_name = f"fc{first + len(hidden)}"
        self.add_module(self.out_name, nn.Linear(sizes[-1], input_dim))

    def features(self, z: Tensor) -> Tensor:
        """The last hidden layer; the logits are linear in it (``output_layer``)."""
        for name in self.names:
            z = self.act(getattr(self, name)(z))
        return z

    @property
    def hidden_layers(self) -> list[nn.Linear]:
        """The layers ``features`` runs, each followed by ``activation``."""
        return [getattr(self, name) for name in self.names]

    @property
    def output_layer(self) -> nn.Linear:
        return getattr(self, self.out_name)

    def forward(self, z: Tensor) -> Tensor:
        return self.output_layer(self.features(z))

    def page_ops(self) -> list[dict[str, Any]]:
        ops: list[dict[str, Any]] = []
        for name in self.names:
            ops += [_linear_op(getattr(self, name)), {"op": self.activation}]
        return [*ops, _linear_op(self.output_layer)]


class ConvEncoder(nn.Module):
    """A 28x28 image -> conv 4x4 stride 2 (channels[0]) -> conv 4x4 stride 2 (channels[1]), ReLU
    -> (mu, logvar) by two linear maps from the 7x7 feature map: the common small convolutional
    VAE encoder (e.g. pytorch/examples' DCGAN discriminator, halved)."""

    def __init__(self, input_dim: int, latent_dim: int, channels: Sequence[int] = (32, 64)):
        super().__init__()
        self.side = math.isqrt(input_dim)
        if self.side**2 != input_dim or self.side % 4:
            raise ValueError(f"model.net=conv needs square images with a side divisible by 4, not {input_dim} pixels")
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 4, stride=2, padding=1)
        flat = c2 * (self.side // 4) ** 2
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_logvar = nn.Linear(flat, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = x.reshape(-1, 1, self.side, self.side)
        h = torch.relu(self.conv2(torch.relu(self.conv1(h)))).flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)


class ConvDecoder(nn.Module):
    """The encoder mirrored: z -> linear to channels[1] x 7 x 7, ReLU -> transposed conv 4x4 stride 2
    (channels[0]), ReLU -> transposed conv 4x4 stride 2 -> 28x28 logits."""

    def __init__(self, input_dim: int, latent_dim: int, channels: Sequence[int] = (32, 64)):
        super().__init__()
        self.side = math.isqrt(input_dim)
        c1, c2 = channels
        self.grid = (c2, self.side // 4, self.side // 4)
        self.fc = nn.Linear(latent_dim, math.prod(self.grid))
        self.deconv1 = nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1)
        self.deconv2 = nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        # Channels-last activations, written so by the linear map itself (its rows taken in
        # (row, column, channel) order, no copy), and ReLUs in place: the plain NCHW form's logits
        # to the bit. Without gradients on a CPU (the bound, the test pass, figures), the last
        # layer by conv_transpose_by_fold: its logits to fp32 rounding. In the k = 5000 bound,
        # almost all decodes, that made 2.1x the plain form's decodes a second, 1.5x those with
        # torch's last layer (benchmarks/conv_decode.py); training, where it made epochs slower
        # (14.3 against 13.0 s), keeps torch's layer and its numbers.
        channels, side, _ = self.grid
        weight = self.fc.weight.view(channels, side, side, -1).permute(1, 2, 0, 3).reshape(-1, self.fc.in_features)
        bias = self.fc.bias.view(channels, side, side).permute(1, 2, 0).reshape(-1)
        h = nn.functional.linear(z, weight, bias).relu_().view(-1, side, side, channels).permute(0, 3, 1, 2)
        h = self.deconv1(h).relu_()
        # A GPU keeps cuDNN's. A graph being recorded (a TorchScript trace; torch.export, under the
        # ONNX export, counts as compiling) takes torch's layer whatever the grad mode: it is the
        # layer a graph's runtime knows, and the fold a speed-up for this process's CPU only.
        recording = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if h.device.type == "cpu" and not torch.is_grad_enabled() and not recording:
            return conv_transpose_by_fold(h, self.deconv2).flatten(1)
        return self.deconv2(h).flatten(1)

    def page_ops(self) -> list[dict[str, Any]]:
        return [
            _linear_op(self.fc), {"op": "relu"}, {"op": "reshape", "shape": list(self.grid)},
            _deconv_op(self.deconv1), {"op": "relu"}, _deconv_op(self.deconv2),
        ]  # fmt: skip


def conv_transpose_by_fold(h: Tensor, layer: nn.ConvTranspose2d) -> Tensor:
    """``layer(h)`` as one matrix product (each input pixel's kernel-sized patch of outputs) and
    ``fold``, which sums the overlapping patches: the same values to fp32 rounding. On a CPU, torch
    runs a transposed convolution with one output channel (the last layer's) through oneDNN at
    about a fifth of this speed (256 rows, one thread, AMD EPYC). Groups, dilation and output
    padding are the defaults'."""
    n, c_in, height, width = h.shape
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    patches = h.permute(0, 2, 3, 1).reshape(n, height * width, c_in) @ layer.weight.flatten(1)
    size = ((height - 1) * sh - 2 * ph + kh, (width - 1) * sw - 2 * pw + kw)
    out = nn.functional.fold(patches.transpose(1, 2), size, (kh, kw), stride=(sh, sw), padding=(ph, pw))
    return out if layer.bias is None else out + layer.bias.view(1, -1, 1, 1)


def _linear_op(layer: nn.Linear) -> dict[str, Any]:
    return {"op": "linear", "weight": layer.weight, "bias": layer.bias}


def _deconv_op(layer: nn.ConvTranspose2d) -> dict[str, Any]:
    return {"op": "conv_transpose2d", "weight": layer.weight, "bias": layer.bias,
            "stride": layer.stride[0], "padding": layer.padding[0]}  # fmt: skip


@dataclass(frozen=True)
class NetPair:
    """A net as the VAE uses it: the encoder and decoder classes, each built as
    ``cls(input_dim, latent_dim, **settings)``, the settings both take with their defaults (what a
    checkpoint of it stores), and a check of a full set of settings (raises ValueError in one line)."""

    encoder: type[nn.Module]
    decoder: type[nn.Module]
    defaults: dict[str, Any]
    check: Callable[[dict[str, Any]], None] = field(default=lambda settings: None)
    # the settings a table names it by (``mlp 400 relu``): their values, joined
    label_keys: tuple[str, ...] = ()


def _two_conv_layers(settings: dict[str, Any]) -> None:
    if len(settings["channels"]) != 2:
        raise ValueError(f"model.net.channels={settings['channels']}: the conv net has two layers, give two sizes")


NETS: Registry[NetPair] = Registry("net", "model.net.name")


def _known_activation(settings: dict[str, Any]) -> None:
    _activation(settings["activation"])


NETS.register("mlp")(
    NetPair(
        MLPEncoder, MLPDecoder, {"hidden": [400], "activation": "relu"}, _known_activation, ("hidden", "activation")
    ),
)
NETS.register("conv")(NetPair(ConvEncoder, ConvDecoder, {"channels": [32, 64]}, _two_conv_layers, ("channels",)))


def net_settings(net: dict[str, Any]) -> dict[str, Any]:
    """``net`` as plain, checked data: its name and every setting of that net (defaults filled in).
    What a checkpoint stores and what ``build_nets`` takes; a bad name or setting is one line."""
    net = dict(net)
    name = net.pop("name", "mlp")
    pair = NETS.get(name)
    defaults = pair.defaults
    unknown = sorted(set(net) - set(defaults))
    if unknown:
        raise ValueError(f"model.net.{unknown[0]} is not a setting of the {name} net (it takes {', '.join(defaults)})")
    settings = {**defaults, **net}
    for key in ("hidden", "channels"):
        if key in settings:
            sizes = settings[key]
            if isinstance(sizes, str | bytes) or not isinstance(sizes, Sequence) or not sizes:
                raise ValueError(f"model.net.{key}={sizes!r} must be a list of layer sizes")
            if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
                raise ValueError(f"model.net.{key}={list(sizes)!r}: every size must be an integer >= 1")
            settings[key] = [int(s) for s in sizes]
    pair.check(settings)
    return {"name": name, **settings}


def net_label(net: dict[str, Any]) -> str:
    """A net in a few words, for tables and TensorBoard: ``mlp 400 relu``, ``conv 32-64``."""
    settings = net_settings(net)
    words = [settings["name"]]
    for key in NETS.get(settings["name"]).label_keys:
        value = settings[key]
        words.append("-".join(map(str, value)) if isinstance(value, list | tuple) else str(value))
    return " ".join(words)


def build_nets(net: dict[str, Any], input_dim: int, latent_dim: int) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) pair that ``net`` names, built encoder first."""
    settings = net_settings(net)
    pair = NETS.get(settings.pop("name"))
    return pair.encoder(input_dim, latent_dim, **settings), pair.decoder(input_dim, latent_dim, **settings)
