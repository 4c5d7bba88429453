"""Diagnostics of the GradNCP score (paper Sec. 3.5, Fig. 4 and Fig. 9).

The score ranks a point by the norm of its loss gradient with respect to the *last layer* only.
The paper justifies it by its correlation with the norm of the gradient with respect to *all*
parameters, which these functions measure for any model, at any parameters (the
initialisation, or any step of the inner loop), chunk by chunk so that the exact per-point
gradients of the whole network never have to fit in memory at once.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from . import losses
from ._params import chunk_slices, static_tensors, task_slice
from ._scoring import plan
from .losses import LossFn

__all__ = ["gradient_norms", "pearson", "score_correlation"]


def gradient_norms(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn = losses.mse,
    names: Sequence[str] | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """Exact norm of each point's loss gradient with respect to the parameters in ``names``
    (default: all in ``params``), ``(tasks, points)``.

    Every point gets its own (expanded, not copied) view of the parameters, the model runs on
    one point per view through ``torch.func.vmap``, and one ``autograd.grad`` gives every view
    its own point's gradient; ``chunk_size`` points at a time bound the memory to
    ``chunk_size`` copies of the gradient. Only for models that treat points independently
    (no batch norm over points).

    Args:
        model: the module.
        params: per-task parameters ``(tasks, *shape)``.
        x: inputs ``(tasks, points, ...)``.
        y: targets ``(tasks, points, ...)``.
        loss_fn: per-point loss.
        names: the parameters whose gradient is measured.
        chunk_size: points per pass.

    Example:
        >>> import torch, ncp
        >>> from ncp.diagnostics import gradient_norms
        >>> model = torch.nn.Linear(2, 1)
        >>> params = ncp.functional.init_params(model, 1, detach=True)
        >>> gradient_norms(model, params, torch.rand(1, 5, 2), torch.rand(1, 5, 1)).shape
        torch.Size([1, 5])
    """
    names = list(params) if names is None else list(names)
    static = static_tensors(model)
    rows = []
    for i in range(x.shape[0]):
        theta = {k: v.detach() for k, v in task_slice(params, i).items()}
        parts = []
        for sl in chunk_slices(x.shape[1], chunk_size):
            xs, ys = x[i, sl], y[i, sl]
            n = xs.shape[0]
            views = {k: theta[k].unsqueeze(0).expand(n, *theta[k].shape) for k in names}
            views = {k: v.requires_grad_(True) for k, v in views.items()}
            rest = {**{k: v for k, v in theta.items() if k not in views}, **static}
            with torch.enable_grad():
                out = vmap(partial(_one_point, model, rest))(views, xs)  # (n, 1, ...)
                point_losses = loss_fn(out.transpose(0, 1), ys.unsqueeze(0))  # (1, n)
                grads = torch.autograd.grad(point_losses.sum(), list(views.values()))
            dtype = torch.promote_types(grads[0].dtype, torch.float32)
            sq = sum(g.flatten(1).to(dtype).pow(2).sum(1) for g in grads)
            assert isinstance(sq, Tensor)
            parts.append(sq.sqrt())
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def _one_point(
    model: nn.Module, rest: Dict[str, Tensor], p: Dict[str, Tensor], xj: Tensor
) -> Tensor:
    return functional_call(model, {**p, **rest}, (xj.unsqueeze(0),))


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` ``(tasks, points)`` along the points,
    ``(tasks,)``; NaN for a task where either is constant."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def score_correlation(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn = losses.mse,
    head: str | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """Per task, the Pearson correlation between the GradNCP score (the last layer's gradient
    norm, Eq. 2) and the exact gradient norm over all of ``params`` (paper Fig. 9),
    ``(tasks,)``.

    Call it with the model's own parameters (``ncp.functional.init_params(model, tasks,
    detach=True)``) for an initialisation, or with ``MetaStepResult.params`` or
    ``ncp.adapt(...).params`` for any step of adaptation.

    Example:
        >>> import torch, ncp
        >>> from ncp.diagnostics import score_correlation
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> x, y = torch.rand(2, 64, 2), torch.rand(2, 64, 1)
        >>> r = score_correlation(model, ncp.functional.init_params(model, 2, detach=True), x, y)
        >>> r.shape, bool((r > 0).all())
        (torch.Size([2]), True)
    """
    how = plan(model, params, x, y, score="gradncp", loss_fn=loss_fn, head=head)
    scores = how(model, params, x, y, loss_fn=loss_fn, chunk_size=chunk_size)
    full = gradient_norms(model, params, x, y, loss_fn=loss_fn, chunk_size=chunk_size)
    return pearson(scores.to(full.dtype), full)
