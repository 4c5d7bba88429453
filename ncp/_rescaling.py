"""Test-time gradient rescaling (paper Sec. 2.4, Eq. 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Mapping, Tuple

import torch
from torch import Tensor, nn

from ._inner import detached_leaves, task_gradients, task_losses
from ._params import per_task_norm
from .losses import LossFn

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

    def rescale(
        self,
        model: nn.Module,
        params: Mapping[str, Tensor],
        full_grads: Mapping[str, Tensor],
        kept_x: Tensor,
        kept_y: Tensor,
        *,
        loss_fn: LossFn,
        full_loss: Tensor | None = None,
        x: Tensor | None = None,
        y: Tensor | None = None,
        vmap_tasks: bool = True,
        chunk_size: int | None = None,
    ) -> Dict[str, Tensor]:
        """One test-time step's gradients (Eq. 4): ``full_grads``, taken on the full context at
        ``params``, rescaled task by task to the kept context ``(kept_x, kept_y)``.

        ``mode="grad"`` takes the kept context's gradient (over the entries of
        ``full_grads``); ``mode="loss"`` its loss, against ``full_loss`` (computed on ``x``,
        ``y`` when not given). :func:`ncp.adapt` and :mod:`ncp.interop.higher` both step with
        this; call it from a loop of your own the same way.

        Args:
            model: the module.
            params: per-task parameters ``(tasks, *shape)`` the gradients were taken at.
            full_grads: full-context gradients ``(tasks, *shape)`` by parameter name.
            kept_x: the kept context inputs ``(tasks, k, ...)`` (a :class:`ncp.Pruned`'s).
            kept_y: the kept context targets ``(tasks, k, ...)``.
            loss_fn: per-point loss.
            full_loss: ``(tasks,)`` full-context loss at ``params`` (``mode="loss"``).
            x: full context inputs, for ``mode="loss"`` without ``full_loss``.
            y: full context targets, likewise.
            vmap_tasks: vectorise over tasks.
            chunk_size: points per pass for the kept context's gradient or loss.
        """
        if self.mode == "grad":
            with torch.enable_grad():
                pruned, _ = task_gradients(
                    model,
                    detached_leaves(params),
                    kept_x,
                    kept_y,
                    loss_fn,
                    create_graph=False,
                    vmap_tasks=vmap_tasks,
                    names=list(full_grads),
                    chunk_size=chunk_size,
                )
            # The factor is a number per task: no graph through it, whatever full_grads carry.
            detached = {k: g.detach() for k, g in full_grads.items()}
            return scale_grads(full_grads, self.factor(full_grads=detached, pruned_grads=pruned))
        with torch.no_grad():
            if full_loss is None:
                if x is None or y is None:
                    raise ValueError(
                        "GradRescaler(mode='loss').rescale needs `full_loss`, or the full "
                        "context `x` and `y` to compute it."
                    )
                full_loss = task_losses(
                    model, params, x, y, loss_fn, vmap_tasks=vmap_tasks, chunk_size=chunk_size
                )
            pruned_loss = task_losses(
                model, params, kept_x, kept_y, loss_fn, vmap_tasks=vmap_tasks, chunk_size=chunk_size
            )
        return self(full_grads, full_loss=full_loss, pruned_loss=pruned_loss)
