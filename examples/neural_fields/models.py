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


class NeRV(nn.Module):
    """A small NeRV (Chen et al., 2021): one frame per input, decoded by convolutions.

    A frame time ``t`` in ``[-1, 1]`` goes through a sinusoidal positional encoding and an MLP
    to a ``channels x base x base`` feature map, then ``blocks`` NeRV blocks (3x3 convolution to
    4x the channels, pixel shuffle doubling the side, GELU) and a 3x3 convolution head to the
    frame's channels. ``resolution = base * 2**blocks``. The paper uses 4 blocks at 128x128
    (Appendix A.2).

    A *point* of ncp's context is then a whole frame: ``x`` is ``(frames, 1)`` and the output
    ``(frames, resolution, resolution, out_channels)``, channels last like the video tensors
    (:func:`examples.neural_fields.signals.frame_context`). Pruning keeps whole frames, and the
    GradNCP score of a frame is the norm of its loss gradient with respect to the head
    convolution's weight and bias; ncp computes it per frame by autograd (its ``"exact"``
    strategy, because the head is not a linear layer applied point by point).

    Args:
        out_channels: channels of a frame (3 for RGB).
        resolution: frame side; a multiple of ``2**blocks``.
        blocks: NeRV blocks (each doubles the side).
        channels: feature channels of every block.
        frequencies: positional-encoding frequencies (``sin`` and ``cos`` of each).
        hidden: width of the MLP.
    """

    def __init__(
        self,
        out_channels: int = 3,
        resolution: int = 32,
        blocks: int = 3,
        channels: int = 32,
        frequencies: int = 8,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if blocks < 1 or resolution % (2**blocks) or resolution < 2**blocks:
            raise ValueError(
                f"`resolution` must be a multiple of 2**blocks = {2**blocks} (>= it), got "
                f"resolution={resolution} with blocks={blocks}."
            )
        self.base, self.channels, self.out_channels = (
            resolution // 2**blocks,
            channels,
            out_channels,
        )
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(frequencies).float())
        self.mlp = nn.Sequential(
            nn.Linear(2 * frequencies, hidden),
            nn.GELU(),
            nn.Linear(hidden, channels * self.base * self.base),
            nn.GELU(),
        )
        stages: list = []
        for _ in range(blocks):
            stages += [
                nn.Conv2d(channels, 4 * channels, 3, padding=1),
                nn.PixelShuffle(2),
                nn.GELU(),
            ]
        self.blocks = nn.Sequential(*stages)
        self.head = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, t: Tensor) -> Tensor:
        angles = t * self.freqs  # (frames, frequencies)
        code = torch.cat([angles.sin(), angles.cos()], dim=-1)
        maps = self.mlp(code).view(-1, self.channels, self.base, self.base)
        return self.head(self.blocks(maps)).permute(0, 2, 3, 1)
