"""A residual convolutional encoder and decoder for 28x28 images: the conv net's two stride-2
stages, each followed by residual blocks (3x3, ReLU, 3x3, added to the block's input, ReLU; He et
al. 2016). The decoder's blocks are stride-1 transposed convolutions, so that the report's page,
which runs linear, transposed-convolution and residual operations, can decode z itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vae_lightning.model.nets import NetPair


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, transposed: bool) -> None:
        super().__init__()
        layer = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.first, self.second = layer(channels, channels, 3, padding=1), layer(channels, channels, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return torch.relu(h + self.second(torch.relu(self.first(h))))

    def page_ops(self) -> list[dict[str, Any]]:
        return [{"op": "save"}, _deconv_op(self.first), {"op": "relu"}, _deconv_op(self.second),
                {"op": "add_saved"}, {"op": "relu"}]  # fmt: skip


def _deconv_op(layer: nn.ConvTranspose2d) -> dict[str, Any]:
    return {"op": "conv_transpose2d", "weight": layer.weight, "bias": layer.bias,
            "stride": layer.stride[0], "padding": layer.padding[0]}  # fmt: skip


class ResidualConvEncoder(nn.Module):
    def __init__(self, input_dim: int, latent_dim: int, channels: Sequence[int] = (32, 64), blocks: int = 1):
        super().__init__()
        self.side = round(input_dim**0.5)
        c1, c2 = channels
        self.down1 = nn.Conv2d(1, c1, 4, stride=2, padding=1)
        self.res1 = nn.Sequential(*(ResidualBlock(c1, False) for _ in range(blocks)))
        self.down2 = nn.Conv2d(c1, c2, 4, stride=2, padding=1)
        self.res2 = nn.Sequential(*(ResidualBlock(c2, False) for _ in range(blocks)))
        flat = c2 * (self.side // 4) ** 2
        self.fc_mu, self.fc_logvar = nn.Linear(flat, latent_dim), nn.Linear(flat, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.relu(self.down1(x.reshape(-1, 1, self.side, self.side)))
        h = self.res2(torch.relu(self.down2(self.res1(h)))).flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)


class ResidualConvDecoder(nn.Module):
    def __init__(self, input_dim: int, latent_dim: int, channels: Sequence[int] = (32, 64), blocks: int = 1):
        super().__init__()
        side = round(input_dim**0.5)
        c1, c2 = channels
        self.grid = (c2, side // 4, side // 4)
        self.fc = nn.Linear(latent_dim, c2 * (side // 4) ** 2)
        self.res3 = nn.Sequential(*(ResidualBlock(c2, True) for _ in range(blocks)))
        self.up1 = nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1)
        self.res4 = nn.Sequential(*(ResidualBlock(c1, True) for _ in range(blocks)))
        self.up2 = nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.res3(torch.relu(self.fc(z)).view(-1, *self.grid))
        return self.up2(self.res4(torch.relu(self.up1(h)))).flatten(1)

    def page_ops(self) -> list[dict[str, Any]]:
        ops: list[dict[str, Any]] = [{"op": "linear", "weight": self.fc.weight, "bias": self.fc.bias}, {"op": "relu"},
                                     {"op": "reshape", "shape": list(self.grid)}]  # fmt: skip
        for block in self.res3:
            ops += block.page_ops()
        ops += [_deconv_op(self.up1), {"op": "relu"}]
        for block in self.res4:
            ops += block.page_ops()
        return [*ops, _deconv_op(self.up2)]


def _check(settings: dict[str, Any]) -> None:
    if len(settings["channels"]) != 2:
        raise ValueError(f"model.net.channels={settings['channels']}: the resconv net has two stages, give two sizes")
    blocks = settings["blocks"]
    if not (isinstance(blocks, int) and not isinstance(blocks, bool) and blocks >= 0):
        raise ValueError(f"model.net.blocks={blocks!r} must be an integer >= 0 (residual blocks per stage)")


RESIDUAL_CONV = NetPair(ResidualConvEncoder, ResidualConvDecoder, {"channels": [32, 64], "blocks": 1}, _check,
                        ("channels", "blocks"))  # fmt: skip
