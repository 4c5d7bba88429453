"""Small models covering the kinds of nn.Module ncp must wrap."""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp(d_in: int = 2, d_out: int = 1, hidden: int = 16, bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, d_out, bias=bias),
    )


class SigmoidHead(nn.Module):
    """An activation after the head: the score must differentiate through it."""

    def __init__(self, d_in: int = 2, d_out: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.body(x)))


class Frozen(nn.Module):
    """A frozen random-feature layer in front of a trainable MLP, plus a buffer."""

    def __init__(self, d_in: int = 2, d_out: int = 1) -> None:
        super().__init__()
        self.features = nn.Linear(d_in, 12)
        self.features.requires_grad_(False)
        self.register_buffer("scale", torch.tensor(1.5))
        self.net = nn.Sequential(nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(x) * self.scale)


class Conv4(nn.Module):
    """A small Conv4-style image classifier (GroupNorm; points are images)."""

    def __init__(self, classes: int = 3, channels: int = 4, norm: str = "group") -> None:
        super().__init__()
        blocks = []
        c_in = 1
        for _ in range(2):
            norm_layer = (
                nn.GroupNorm(2, channels)
                if norm == "group"
                else nn.BatchNorm2d(channels, track_running_stats=(norm == "bn-running"))
            )
            blocks += [
                nn.Conv2d(c_in, channels, 3, padding=1),
                norm_layer,
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = channels
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(channels * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class ConvHead(nn.Module):
    """A neural field whose last layer is a 1x1 conv over a per-point feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 8), nn.Tanh())
        self.head = nn.Conv1d(8, 3, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x).unsqueeze(-1)  # (points, 8, 1)
        return self.head(h).squeeze(-1)  # (points, 3)


class HeadCalledTwice(nn.Module):
    """Calls its only layer twice per forward pass: GradNCP scoring must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.lin(x))


class _Sine(nn.Module):
    def __init__(self, w0: float) -> None:
        super().__init__()
        self.w0 = w0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.w0 * x)


def siren(
    in_features: int = 2,
    out_features: int = 3,
    hidden: int = 256,
    layers: int = 5,
    w0: float = 30.0,
) -> nn.Sequential:
    """A SIREN field network for tests and benchmarks: ``layers`` linear layers (sine after all
    but the last), SIREN's uniform initialisation (first layer ``1/in``, the rest
    ``sqrt(6/in)/w0``). The paper's images use 5 x 256."""
    sizes = [in_features] + [hidden] * (layers - 1) + [out_features]
    modules: list = []
    for i in range(layers):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        bound = 1.0 / sizes[i] if i == 0 else math.sqrt(6.0 / sizes[i]) / w0
        nn.init.uniform_(linear.weight, -bound, bound)
        modules.append(linear)
        if i < layers - 1:
            modules.append(_Sine(w0))
    return nn.Sequential(*modules)


class FrameDecoder(nn.Module):
    """A NeRV-shaped model: one frame per input time ``(points, 1)`` -> ``(points, H, W, 3)``
    through an MLP and convolutions with a convolutional head (for tests and benchmarks that
    must not depend on ``examples/``)."""

    def __init__(self, side: int = 16, channels: int = 16) -> None:
        super().__init__()
        self.base, self.channels = side // 4, channels
        self.mlp = nn.Sequential(
            nn.Linear(1, 32), nn.GELU(), nn.Linear(32, channels * (side // 4) ** 2)
        )
        self.up = nn.Sequential(
            nn.Conv2d(channels, 4 * channels, 3, padding=1),
            nn.PixelShuffle(2),
            nn.GELU(),
            nn.Conv2d(channels, 4 * channels, 3, padding=1),
            nn.PixelShuffle(2),
            nn.GELU(),
        )
        self.head = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        maps = self.mlp(t).view(-1, self.channels, self.base, self.base)
        return self.head(self.up(maps)).permute(0, 2, 3, 1)
