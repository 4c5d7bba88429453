"""Conv4, the standard few-shot classification backbone (Vinyals et al., 2016; MAML, 2017).

Four blocks of ``3x3 conv -> norm -> ReLU -> 2x2 max-pool`` and a linear head. Batch norm keeps
no running statistics (``track_running_stats=False``): every forward pass normalises with the
statistics of the images it is given, as MAML does ("transductive" batch norm), so the inner
loop never writes state into the module and ncp accepts it in training mode. ``norm="group"``
uses ``nn.GroupNorm`` instead, which normalises each image on its own.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import Tensor, nn

Norm = Literal["batch", "group"]
NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    return nn.GroupNorm(min(8, channels), channels)


class Conv4(nn.Module):
    """Four conv blocks and a linear head mapping ``(points, channels, size, size)`` images to
    ``(points, ways)`` logits.

    Args:
        ways: number of classes of an episode (the head's outputs).
        in_channels: image channels (3 for mini-ImageNet, 1 for glyphs and Fashion-MNIST).
        hidden: filters of every conv layer (paper and MAML: 64 on mini-ImageNet).
        image_size: side of the square input images; fixes the head's input size.
        norm: ``"batch"`` (batch norm without running statistics) or ``"group"``.

    Raises:
        ValueError: on a non-positive size, or an image too small for four 2x2 poolings.

    Example:
        >>> import torch
        >>> Conv4(ways=5, in_channels=1, hidden=8, image_size=28)(torch.rand(10, 1, 28, 28)).shape
        torch.Size([10, 5])
    """

    def __init__(
        self,
        ways: int,
        *,
        in_channels: int = 3,
        hidden: int = 64,
        image_size: int = 84,
        norm: Norm = "batch",
    ) -> None:
        super().__init__()
        for name, value in (
            ("ways", ways),
            ("in_channels", in_channels),
            ("hidden", hidden),
            ("image_size", image_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`Conv4.{name}` must be a positive int, got {value!r}.")
        if image_size < 16:
            raise ValueError(
                f"`Conv4.image_size` must be >= 16 (four 2x2 poolings), got {image_size}; "
                "resize the images to 28 or more."
            )
        if norm not in NORMS:
            raise ValueError(f"`Conv4.norm` must be one of {list(NORMS)}, got {norm!r}.")
        blocks = []
        channels, side = in_channels, image_size
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
                _norm(norm, hidden),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels, side = hidden, side // 2
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(hidden * side * side, ways)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(points, ways)`` of images ``(points, channels, size, size)``."""
        return self.head(self.features(x))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(
    ways: int, in_channels: int, hidden: int, image_size: int, norm: str, seed: int
) -> Conv4:
    """A :class:`Conv4` initialised from ``seed`` (PyTorch's default initialisation), leaving
    the global random state untouched."""
    if norm not in NORMS:
        raise ValueError(f"`--norm` must be one of {list(NORMS)}, got {norm!r}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Conv4(
            ways,
            in_channels=in_channels,
            hidden=hidden,
            image_size=image_size,
            norm=cast(Norm, norm),
        )
