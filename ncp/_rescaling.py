"""Test-time gradient rescaling (paper Sec. 2.4, Eq. 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Mapping, Tuple

import torch
from torch import Tensor

from ._params import per_task_norm

MODES: Tuple[str, ...] = ("grad", "loss")


def safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` per task, and 0 where the denominator is 0."""
    den = denominator.to(numerator.dtype)
    ok = den > 0
    return torch.where(
        ok, numerator / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den)
    )


def scale_grads(grads: Mapping[str, Tensor], factor: Tensor) -> Dict[str, Tensor]:
    """Multiply each task's gradient by ``factor`` ``(tasks,)``."""
    out = {}
    for k, g in grads.items():
        f = factor.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
        out[k] = g * f
    return out


@dataclass(frozen=True, kw_only=True)
class GradRescaler:
    """Rescales full-context test-time gradients to the size seen during meta-training.

    At each test-time step the full-context gradient ``g_full`` of a task is multiplied by
    ``||g_pruned|| / ||g_full||`` (``mode="grad"``, Eq. 4), where ``g_pruned`` is the gradient on
    the context that the pruner keeps, so the step has the pruned gradient's norm and the full
    gradient's direction. ``mode="loss"`` multiplies by ``loss_pruned / loss_full`` instead, the
    cheaper variant of Sec. 3.4 that needs no second gradient. A zero denominator gives a zero
    step.

    Args:
        mode: ``"grad"`` or ``"loss"``.

    Example:
        >>> import torch, ncp
        >>> full = {"w": torch.tensor([[3.0, 4.0]])}
        >>> pruned = {"w": torch.tensor([[0.0, 10.0]])}
        >>> ncp.GradRescaler()(full, pruned_grads=pruned)["w"]
        tensor([[6., 8.]])

    References:
        Tack et al., NeurIPS 2023, Sec. 2.4 (Eq. 4) and Sec. 3.4.
    """

    mode: Literal["grad", "loss"] = "grad"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(
                f"`GradRescaler.mode` must be one of {list(MODES)}, got {self.mode!r}."
            )

    def factor(
        self,
        *,
        full_grads: Mapping[str, Tensor] | None = None,
        pruned_grads: Mapping[str, Tensor] | None = None,
        full_loss: Tensor | None = None,
        pruned_loss: Tensor | None = None,
    ) -> Tensor:
        """The per-task multiplier ``(tasks,)`` for this mode."""
        if self.mode == "grad":
            if full_grads is None or pruned_grads is None:
                raise ValueError("GradRescaler(mode='grad') needs `full_grads` and `pruned_grads`.")
            return safe_ratio(per_task_norm(pruned_grads), per_task_norm(full_grads))
        if full_loss is None or pruned_loss is None:
            raise ValueError("GradRescaler(mode='loss') needs `full_loss` and `pruned_loss`.")
        dtype = torch.promote_types(full_loss.dtype, torch.float32)
        return safe_ratio(pruned_loss.detach().to(dtype), full_loss.detach().to(dtype))

    def __call__(
        self,
        full_grads: Mapping[str, Tensor],
        *,
        pruned_grads: Mapping[str, Tensor] | None = None,
        full_loss: Tensor | None = None,
        pruned_loss: Tensor | None = None,
    ) -> Dict[str, Tensor]:
        """``full_grads`` rescaled task by task (shapes ``(tasks, ...)``)."""
        f = self.factor(
            full_grads=full_grads,
            pruned_grads=pruned_grads,
            full_loss=full_loss,
            pruned_loss=pruned_loss,
        )
        return scale_grads(full_grads, f)
