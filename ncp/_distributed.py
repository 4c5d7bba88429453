"""Distributed meta-training: averaging meta-gradients across ranks.

A ``DistributedDataParallel`` wrapper averages gradients only through its own ``forward``,
which a MAML inner loop never calls (it runs the wrapped module functionally, and
``backward(create_graph=True)`` through DDP is not supported). ncp therefore unwraps the
module and inserts, between each parameter and its per-task copies, an identity whose backward
all-reduces the gradient and divides it by the world size. After ``loss.backward()`` every rank
holds the average of the ranks' meta-gradients, the meta-gradient of the union of their tasks
when every rank has the same number of tasks.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


class _AverageGradient(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient and divides by the group size.

    The all-reduce has no autograd formula: a backward that builds a graph
    (``create_graph=True``) raises rather than differentiate through it as if it were the
    identity, which would give silently wrong higher-order gradients.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        if torch.is_grad_enabled() and grad.requires_grad:
            raise RuntimeError(
                "the meta-gradient of a DistributedDataParallel model is averaged across ranks "
                "by an all-reduce, which cannot be differentiated; call backward without "
                "create_graph=True (higher-order derivatives of the meta-loss are not supported "
                "in a distributed run)."
            )
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad / dist.get_world_size(group=ctx.group), None


def unwrap(
    model: nn.Module, *, meta_gradients: bool
) -> Tuple[nn.Module, Callable[[Tensor], Tensor] | None]:
    """The module to run functionally and, for a DDP-wrapped model, the gradient-averaging wrap.

    Args:
        model: the user's model, DDP-wrapped or not.
        meta_gradients: whether the caller builds a graph to ``theta_0`` (``meta_step``);
            test-time adaptation only unwraps.

    Raises:
        ValueError: with ``meta_gradients``, in a multi-process run, for a module that is not
            DDP-wrapped (its meta-gradients would silently stay local to each rank).
    """
    if isinstance(model, DistributedDataParallel):
        group = model.process_group

        def average(p: Tensor) -> Tensor:
            return _AverageGradient.apply(p, group)

        return model.module, average
    if (
        meta_gradients
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    ):
        raise ValueError(
            f"`model` is a plain {type(model).__name__} in a distributed run with "
            f"{dist.get_world_size()} processes: its meta-gradients would stay local to each "
            "rank with no error. Pass the DistributedDataParallel-wrapped model, "
            "ncp.meta_step(DistributedDataParallel(model), batch, cfg): ncp unwraps it and "
            "averages the meta-gradients across ranks."
        )
    return model, None
