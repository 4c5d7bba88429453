"""One inner-loop step: per-task loss, per-task gradient, SGD update."""

from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._params import Params, task_forward
from ._scoring import LossFn


def task_losses(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    vmap_tasks: bool = True,
) -> Tensor:
    """Mean per-point loss of each task, ``(tasks,)``."""
    return loss_fn(task_forward(model, params, x, vmap_tasks=vmap_tasks), y).mean(1)


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
) -> Tuple[Dict[str, Tensor], Tensor]:
    """Gradient of each task's mean loss w.r.t. that task's parameters (those in ``names``,
    default all).

    Tasks are independent, so differentiating the *sum* of the task losses with respect to the
    ``(tasks, ...)`` parameters gives every task its own gradient in one backward pass.

    Returns:
        The pair ``(grads, losses)``, a dict shaped like ``params`` and the ``(tasks,)``
        losses.
    """
    losses = task_losses(model, params, x, y, loss_fn, vmap_tasks=vmap_tasks)
    names = list(params) if names is None else list(names)
    grads = torch.autograd.grad(
        losses.sum(), [params[n] for n in names], create_graph=create_graph, allow_unused=True
    )
    for name, g in zip(names, grads, strict=True):
        if g is None:
            raise ValueError(
                f"parameter '{name}' got no gradient from the inner loss; freeze it "
                "(requires_grad=False) or exclude it from the model's forward pass."
            )
    return dict(zip(names, grads, strict=True)), losses


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
) -> Tuple[Params, Tensor]:
    """``steps`` SGD steps with no graph kept between them.

    Returns:
        Detached parameters after the steps and the ``(steps, tasks)`` losses before each step.
    """
    current: Params = {k: v.detach() for k, v in params.items()}
    history = []
    for _ in range(steps):
        with torch.enable_grad():
            leaves = detached_leaves(current)
            grads, losses = task_gradients(
                model, leaves, x, y, loss_fn, create_graph=False, vmap_tasks=vmap_tasks, names=names
            )
        with torch.no_grad():
            current = sgd_update(current, grads, lr)
        history.append(losses.detach())
    return current, torch.stack(history) if history else x.new_zeros(0, x.shape[0])
