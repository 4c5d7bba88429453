"""Learning-progress scores of the paper's Sec. 2.2: self- and target-prediction gain.

Both measure how much a step on one point would lower a loss, the self-prediction gain (SPG)
on that point, the target-prediction gain (TPG) on all the other points. The paper approximates
the step by an SGD update of the last layer only, whose first-order Taylor expansion turns SPG
into ``lr * ||dl/dtheta_head||^2``, the GradNCP score squared (Eq. 2). These are the
baselines of its Fig. 3c, computed without the Taylor approximation: for a linear head
``z = W phi + b`` whose output is the model's output, the last-layer step on point ``j`` moves
the output of every point ``i`` by

    z'_i = z_i - lr * g_j * (phi_j . phi_i + 1),        g_j = dl_j / dz_j,

so SPG costs one forward pass, ``O(M)``, and TPG needs the ``M x M`` kernel ``phi phi^T`` and
``M`` loss evaluations per point, ``O(M^2)``: the reason the paper keeps neither.
"""

from __future__ import annotations

from typing import Callable, Mapping, Tuple

import torch
from torch import Tensor

from ._params import chunk_slices, task_slice
from .losses import LossFn

HeadIO = Callable[[Mapping[str, Tensor], Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]


def gain_scores(
    kind: str,
    head_io: HeadIO,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    lr: float,
    weight: bool,
    bias: bool,
    chunk_size: int | None = None,
) -> Tensor:
    """SPG (``kind="spg"``) or TPG (``"tpg"``) of every point, ``(tasks, points)``.

    ``head_io(params_i, x_i, y_i)`` gives one task's head input ``phi``, ``dl/dz`` and head
    output ``z``. TPG is averaged over the other ``M - 1`` points; ``chunk_size`` bounds the
    points whose step is evaluated at once (``chunk x M`` outputs).
    """
    rows = []
    for i in range(x.shape[0]):
        phi, dz, z = head_io(task_slice(params, i), x[i], y[i])
        dtype = torch.promote_types(phi.dtype, torch.float32)
        phi, dz, z = phi.to(dtype), dz.to(dtype), z.to(dtype)
        base = loss_fn(z.unsqueeze(0), y[i].unsqueeze(0))[0]  # (M,)
        if kind == "spg":
            reach = torch.zeros_like(base)
            if weight:
                reach = reach + phi.pow(2).sum(1)
            if bias:
                reach = reach + 1.0
            moved = z - lr * reach.unsqueeze(1) * dz
            rows.append(base - loss_fn(moved.unsqueeze(0), y[i].unsqueeze(0))[0])
            continue
        m = x.shape[1]
        parts = []
        for sl in chunk_slices(m, chunk_size):
            kernel = torch.zeros(sl.stop - sl.start, m, dtype=dtype, device=phi.device)
            if weight:
                kernel = kernel + phi[sl] @ phi.T
            if bias:
                kernel = kernel + 1.0
            moved = z.unsqueeze(0) - lr * kernel.unsqueeze(2) * dz[sl].unsqueeze(1)  # (J, M, out)
            targets = y[i].unsqueeze(0).expand(moved.shape[0], *y[i].shape)
            gain = base.unsqueeze(0) - loss_fn(moved, targets)  # (J, M)
            own = torch.arange(sl.start, sl.stop, device=phi.device) - sl.start
            gain[own, torch.arange(sl.start, sl.stop, device=phi.device)] = 0.0
            parts.append(gain.sum(1) / max(m - 1, 1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)
