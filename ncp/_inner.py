"""One inner-loop step: per-task loss, per-task gradient, SGD update."""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ._params import Params, chunk_slices, interleaved_slices, task_forward
from .losses import LossFn


def task_losses(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    vmap_tasks: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Mean per-point loss of each task, ``(tasks,)``.

    With ``chunk_size`` (and autograd recording) each chunk's forward pass is checkpointed:
    only its inputs are kept, and ``backward`` recomputes the chunks one at a time, so a
    full-context loss never holds the activations of more than one chunk. The value and its
    gradients (of any order) are those of the unchunked loss.
    """
    points = x.shape[1]
    if chunk_size is None or chunk_size >= points:
        return loss_fn(task_forward(model, params, x, vmap_tasks=vmap_tasks), y).mean(1)
    names = list(params)

    def chunk_sum(xc: Tensor, yc: Tensor, *values: Tensor) -> Tensor:
        out = task_forward(model, dict(zip(names, values, strict=True)), xc, vmap_tasks=vmap_tasks)
        return loss_fn(out, yc).sum(1)

    total = x.new_zeros(())
    for sl in chunk_slices(points, chunk_size):
        args = (x[:, sl], y[:, sl], *params.values())
        if torch.is_grad_enabled():
            part = checkpoint(chunk_sum, *args, use_reentrant=False)
        else:
            part = chunk_sum(*args)
        total = total + part
    return total / points


def task_gradients(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    create_graph: bool,
    vmap_tasks: bool = True,
    names: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> Tuple[Dict[str, Tensor], Tensor]:
    """Gradient of each task's mean loss w.r.t. that task's parameters (those in ``names``,
    default all).

    Tasks are independent, so differentiating the *sum* of the task losses with respect to the
    ``(tasks, ...)`` parameters gives every task its own gradient in one backward pass. With
    ``chunk_size``, a first-order gradient is accumulated chunk by chunk (one chunk's graph at a
    time); with ``create_graph`` the loss is checkpointed instead (see :func:`task_losses`).

    Returns:
        The pair ``(grads, losses)``, a dict shaped like ``params`` and the ``(tasks,)``
        losses.
    """
    names = list(params) if names is None else list(names)
    inputs = [params[n] for n in names]
    points = x.shape[1]
    grads: List[Tensor | None]
    if create_graph or chunk_size is None or chunk_size >= points:
        losses = task_losses(
            model, params, x, y, loss_fn, vmap_tasks=vmap_tasks, chunk_size=chunk_size
        )
        grads = list(
            torch.autograd.grad(losses.sum(), inputs, create_graph=create_graph, allow_unused=True)
        )
    else:
        grads, total = [None for _ in names], x.new_zeros(())
        for sl in interleaved_slices(points, chunk_size):
            out = task_forward(model, params, x[:, sl], vmap_tasks=vmap_tasks)
            part = loss_fn(out, y[:, sl]).sum(1)
            chunk_grads = torch.autograd.grad(part.sum() / points, inputs, allow_unused=True)
            grads = [
                c if g is None else (g if c is None else g + c)
                for g, c in zip(grads, chunk_grads, strict=True)
            ]
            total = total + part.detach()
        losses = total / points
    result: Dict[str, Tensor] = {}
    for name, g in zip(names, grads, strict=True):
        if g is None:
            raise ValueError(
                f"parameter '{name}' got no gradient from the inner loss; freeze it "
                "(requires_grad=False) or exclude it from the model's forward pass."
            )
        result[name] = g
    return result, losses


LR = Union[float, Tensor, Mapping[str, Tensor]]
"""A learning rate: one number, or one (broadcastable) tensor per parameter name."""


def sgd_update(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], lr: LR) -> Params:
    """``theta - lr * g`` for every entry that has a gradient; the others pass through."""
    out = dict(params)
    for k, g in grads.items():
        rate = lr[k] if isinstance(lr, Mapping) else lr
        out[k] = params[k] - rate * g
    return out


def detached_leaves(params: Mapping[str, Tensor]) -> Params:
    """Copies cut from any graph that autograd can differentiate with respect to."""
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def first_order_steps(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    steps: int,
    lr: float,
    vmap_tasks: bool = True,
    names: Sequence[str] | None = None,
    chunk_size: int | None = None,
    select: Callable[[Params, Tensor, Tensor], Tuple[Tensor, ...]] | None = None,
) -> Tuple[Params, Tensor]:
    """``steps`` SGD steps with no graph kept between them (``chunk_size``: see
    :func:`task_losses`). With ``select`` (an :class:`ncp.Selector`, or any function of
    ``(params, x, y)`` whose result starts with the kept ``x`` and ``y``), each step uses the
    points it keeps at the current parameters instead of all of ``(x, y)``.

    Returns:
        Detached parameters after the steps and the ``(steps, tasks)`` losses before each step.
    """
    current: Params = {k: v.detach() for k, v in params.items()}
    history = []
    for _ in range(steps):
        xs, ys = (x, y) if select is None else select(current, x, y)[:2]
        with torch.enable_grad():
            leaves = detached_leaves(current)
            grads, losses = task_gradients(
                model,
                leaves,
                xs,
                ys,
                loss_fn,
                create_graph=False,
                vmap_tasks=vmap_tasks,
                names=names,
                chunk_size=chunk_size,
            )
        with torch.no_grad():
            current = sgd_update(current, grads, lr)
        history.append(losses.detach())
    return current, torch.stack(history) if history else x.new_zeros(0, x.shape[0])
