"""Per-point losses.

Every ncp entry point takes ``loss_fn(pred, target) -> Tensor`` that returns one loss per point,
shape ``(tasks, points)``. Any function with that contract works; these two cover the paper.
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["cross_entropy", "mse"]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""A per-point loss: ``loss_fn(pred, target) -> (tasks, points)``."""


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error averaged over the output dimensions of each point.

    Args:
        pred: model output, ``(tasks, points, *out)``.
        target: same shape as ``pred``.

    Returns:
        ``(tasks, points)`` per-point losses.

    Example:
        >>> import torch, ncp
        >>> ncp.losses.mse(torch.zeros(2, 3, 1), torch.ones(2, 3, 1)).shape
        torch.Size([2, 3])
    """
    if pred.shape != target.shape and not target.is_floating_point() and pred.dim() == 3:
        raise ValueError(
            f"`ncp.losses.mse` got integer targets of shape {tuple(target.shape)} for "
            f"predictions of shape {tuple(pred.shape)}: these look like class labels; pass "
            "loss_fn=ncp.losses.cross_entropy (or MetaConfig(loss_fn=ncp.losses.cross_entropy))."
        )
    if pred.shape != target.shape:
        raise ValueError(
            f"`ncp.losses.mse` needs pred and target of the same shape, got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}. Give y the model's output shape, e.g. (tasks, points, 3) "
            "for RGB."
        )
    sq = (pred - target).pow(2)
    return sq.flatten(2).mean(-1) if sq.dim() > 2 else sq


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of each point.

    Args:
        logits: ``(tasks, points, classes)``.
        labels: integer class indices, ``(tasks, points)``.

    Returns:
        ``(tasks, points)`` per-point losses.

    Example:
        >>> import torch, ncp
        >>> ncp.losses.cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)).shape
        torch.Size([2, 3])
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            "`ncp.losses.cross_entropy` needs logits (tasks, points, classes) and integer labels "
            f"(tasks, points), got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    t, n, c = logits.shape
    return F.cross_entropy(logits.reshape(t * n, c), labels.reshape(t * n), reduction="none").view(
        t, n
    )
