"""Checks run once at the public boundary, so that loop bodies stay free of them."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from ._params import Params, model_device_dtype, task_forward
from .losses import LossFn


def check_pair(x: object, y: object, names: Tuple[str, str] = ("x", "y")) -> None:
    """``x`` and ``y`` are tensors with matching ``(tasks, points)`` leading dimensions."""
    nx, ny = names
    for name, t in ((nx, x), (ny, y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() < 2:
            raise ValueError(
                f"`{name}` must have shape (tasks, points, ...), got {tuple(t.shape)}. "
                f"For a single task use {name}.unsqueeze(0); for scalar targets add a "
                "trailing dimension of size 1."
            )
    assert isinstance(x, Tensor) and isinstance(y, Tensor)
    if x.shape[:2] != y.shape[:2]:
        raise ValueError(
            f"`{nx}` and `{ny}` must share their leading (tasks, points) dimensions, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}. For one task's points, add the task "
            f"dimension: {nx}.unsqueeze(0), {ny}.unsqueeze(0)."
        )
    if x.shape[1] == 0:
        raise ValueError(f"`{nx}` has no points: shape {tuple(x.shape)}.")


def check_device(model: nn.Module, *tensors: Tensor) -> None:
    """Inputs live on the model's device (ncp never moves data behind the user's back)."""
    device, _ = model_device_dtype(model)
    for t in tensors:
        if t.device != device:
            raise ValueError(
                f"the model's parameters are on {device} but an input is on {t.device}; move "
                f"the batch with x.to({str(device)!r}) (ncp follows the inputs' device and "
                "never moves data itself)."
            )


def check_point_losses(losses: object, tasks: int, points: int) -> None:
    """``loss_fn`` returned one loss per point."""
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (tasks, points):
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"`loss_fn` must return per-point losses of shape ({tasks}, {points}), got {got}. "
            "Pass reduction='none' or use ncp.losses.mse / ncp.losses.cross_entropy."
        )


def check_finite(losses: Tensor, what: str) -> None:
    """Raise when any entry of ``losses`` ``(steps, tasks)`` is NaN or infinite."""
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        step, task = (int(i) for i in bad.nonzero()[0])
        raise FloatingPointError(
            f"non-finite {what} loss at step {step} of task {task} "
            f"(value {losses[step, task].item()}). Lower `inner_lr`, check the targets for "
            "NaNs, or clip the model's outputs."
        )


def check_loss_fn(
    model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn, vmap_tasks: bool
) -> None:
    """Run ``loss_fn`` once on a few points of ``(tasks, points, ...)`` inputs: it must
    accept the model's ``(tasks, points, ...)`` output and return per-point losses."""
    n = min(x.shape[1], 8)
    with torch.no_grad():
        pred = task_forward(model, params, x[:, :n], vmap_tasks=vmap_tasks)
        try:
            out = loss_fn(pred, y[:, :n])
        except (RuntimeError, IndexError) as e:
            name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
            raise ValueError(
                f"`loss_fn` ({name}) failed on predictions of shape {tuple(pred.shape)} and "
                f"targets of shape {tuple(y[:, :n].shape)}: {e} ncp calls loss_fn(pred, target) "
                "on (tasks, points, ...) tensors and needs (tasks, points) losses back; "
                "torch.nn.functional losses expect (N, C) inputs, so use "
                "ncp.losses.cross_entropy for class labels or ncp.losses.mse for regression."
            ) from e
    check_point_losses(out, x.shape[0], n)
