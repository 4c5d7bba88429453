"""Neural-field models used by the examples: SIREN and a Fourier-feature MLP.

They are plain ``nn.Module`` s: ncp needs nothing special from a model.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn


class Sine(nn.Module):
    """``sin(w0 * x)``."""

    def __init__(self, w0: float) -> None:
        super().__init__()
        self.w0 = w0

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.w0 * x)


class Siren(nn.Module):
    """SIREN (Sitzmann et al., 2020): linear layers with sine activations and a linear head.

    ``layers`` counts the linear layers (paper: 5 for images and audio, 7 for video), so there
    are ``layers - 1`` sine layers of width ``hidden`` and a linear output layer. Weights use
    SIREN's initialisation: ``U(-1/in, 1/in)`` for the first layer and
    ``U(-sqrt(6/in)/w0, sqrt(6/in)/w0)`` after it.

    Args:
        in_features: coordinate dimensions (2 for images).
        out_features: signal channels (3 for RGB).
        hidden: width of the hidden layers (paper: 256).
        layers: number of linear layers (paper: 5).
        w0: sine frequency (paper: 30; 50 on the sphere).
    """

    def __init__(
        self,
        in_features: int = 2,
        out_features: int = 3,
        hidden: int = 256,
        layers: int = 5,
        w0: float = 30.0,
    ) -> None:
        super().__init__()
        if layers < 2:
            raise ValueError(f"`layers` must be >= 2, got {layers}.")
        dims = [in_features] + [hidden] * (layers - 1)
        blocks: list = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            linear = nn.Linear(d_in, d_out)
            bound = 1.0 / d_in if i == 0 else math.sqrt(6.0 / d_in) / w0
            nn.init.uniform_(linear.weight, -bound, bound)
            blocks += [linear, Sine(w0)]
        head = nn.Linear(hidden, out_features)
        bound = math.sqrt(6.0 / hidden) / w0
        nn.init.uniform_(head.weight, -bound, bound)
        blocks.append(head)
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class FourierFeatureMLP(nn.Module):
    """ReLU MLP on random Fourier features (Tancik et al., 2020); paper Appendix D.3.

    Args:
        in_features: coordinate dimensions.
        out_features: signal channels.
        hidden: width (paper: 256).
        layers: number of linear layers after the feature map (paper: 5).
        scale: standard deviation of the Gaussian frequency matrix (paper: 10).
        features: number of frequencies (the embedding has twice as many entries).
        seed: seed of the fixed frequency matrix (a buffer, never adapted).
    """

    def __init__(
        self,
        in_features: int = 2,
        out_features: int = 3,
        hidden: int = 256,
        layers: int = 5,
        scale: float = 10.0,
        features: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(in_features, features, generator=g) * scale)
        dims = [2 * features] + [hidden] * (layers - 1)
        blocks: list = []
        for d_in, d_out in itertools.pairwise(dims):
            blocks += [nn.Linear(d_in, d_out), nn.ReLU()]
        blocks.append(nn.Linear(hidden, out_features))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        proj = 2 * math.pi * x @ self.freqs
        return self.net(torch.cat([proj.sin(), proj.cos()], dim=-1))
