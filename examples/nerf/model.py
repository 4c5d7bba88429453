"""A simplified NeRF (Mildenhall et al., 2020) as the paper's Table 4 uses it: one MLP (no
coarse/fine pair), no view direction, ReLU layers, volume rendering along each ray; the density
goes through a shifted softplus (mip-NeRF's) instead of NeRF's ReLU.

The model maps rays ``(points, 6)`` (origin, unit direction) to colours ``(points, 3)``, so a
ray is one context point for ncp. Depths are ``samples`` fixed, evenly spaced points between
:data:`~examples.nerf.scenes.NEAR` and :data:`~examples.nerf.scenes.FAR` (no random jitter:
the forward pass is deterministic, so it runs under ``torch.func.vmap`` like any field).

The head (the last ``nn.Linear``, density and colour of every sample) is applied to
``(rays, samples, hidden)`` features, not to one feature vector per ray, so its per-ray loss
gradient is no rank-one outer product: ncp scores it with the exact per-point path
(``ContextPruner`` picks it by itself; docs/concepts.md, "Heads that are not per-point linear").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scenes import FAR, NEAR


class TinyNeRF(nn.Module):
    """Positional encoding of 3-D points, ``layers`` ReLU layers of ``hidden`` units, a linear
    head to (r, g, b, density) (sigmoid colour, ``softplus(raw - 1)`` density), and alpha
    compositing over a white background.

    Args:
        hidden: width of every hidden layer (paper: 256).
        layers: number of hidden layers (paper: 6 layers in all).
        samples: points per ray.
        frequencies: sine/cosine frequencies of the positional encoding, ``2^0 .. 2^(f-1)``.
    """

    def __init__(
        self, hidden: int = 64, layers: int = 3, samples: int = 32, frequencies: int = 6
    ) -> None:
        super().__init__()
        for name, value in (("hidden", hidden), ("layers", layers), ("samples", samples)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        if not isinstance(frequencies, int) or frequencies < 0:
            raise ValueError(f"`frequencies` must be an int >= 0, got {frequencies!r}.")
        edges = torch.linspace(NEAR, FAR, samples + 1)
        self.register_buffer("depths", (edges[1:] + edges[:-1]) / 2, persistent=False)
        self.register_buffer("delta", edges[1:] - edges[:-1], persistent=False)
        self.register_buffer("scales", 2.0 ** torch.arange(frequencies), persistent=False)
        width = 3 + 6 * frequencies
        body: list[nn.Module] = []
        for _ in range(layers):
            body += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(hidden, 4)

    def encode(self, points: Tensor) -> Tensor:
        """``(..., 3)`` points to ``(..., 3 + 6 * frequencies)`` features."""
        scaled = (points[..., None, :] * self.scales[:, None]).flatten(-2)
        return torch.cat([points, scaled.sin(), scaled.cos()], dim=-1)

    def forward(self, rays: Tensor) -> Tensor:
        """Colours ``(points, 3)`` of rays ``(points, 6)``."""
        if rays.shape[-1] != 6:
            raise ValueError(
                f"`rays` must be (points, 6): origin and direction, got {tuple(rays.shape)}."
            )
        origin, direction = rays[..., None, :3], rays[..., None, 3:]
        points = origin + self.depths[:, None] * direction  # (rays, samples, 3)
        raw = self.head(self.body(self.encode(points)))  # (rays, samples, 4)
        # Softplus, shifted as in mip-NeRF (Barron et al., 2021), not ReLU: a ReLU density that
        # falls below zero everywhere renders the white background with no gradient left, and
        # 2 of 6 MAML and random-ray runs ended there with ReLU at outer lr 2e-3.
        rgb, density = torch.sigmoid(raw[..., :3]), F.softplus(raw[..., 3] - 1.0)
        alpha = 1 - torch.exp(-density * self.delta)
        # Light that reaches each sample: the product of (1 - alpha) over the samples before it.
        passed = torch.cumprod(1 - alpha + 1e-10, dim=-1)
        passed = torch.cat([torch.ones_like(passed[..., :1]), passed[..., :-1]], dim=-1)
        weight = alpha * passed
        return (weight[..., None] * rgb).sum(-2) + (1 - weight.sum(-1, keepdim=True))
