"""Per-point importance scores (never selection: see ``_pruning``).

The GradNCP score of a context point is the norm of the gradient of that point's loss with
respect to the parameters of the model's last layer (the *head*), paper Eq. (2) and Appendix B.
For a linear head ``z = W phi + b`` the per-point gradient is ``dl/dz phi^T`` for ``W`` and
``dl/dz`` for ``b``, so its norm factorises without building any per-point gradient tensor:

    ||g|| = ||dl/dz|| * sqrt(||phi||^2 + 1)

``dl/dz`` comes from autograd through whatever follows the head (an activation, the loss), so
the same code covers MSE, a sigmoid after the head and cross-entropy. Other head types get the
exact per-point gradient norm through ``torch.func``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Literal, Mapping, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ._params import (
    chunk_slices,
    forward_hooks,
    head_params,
    parametrised_modules,
    single_forward,
    static_tensors,
    task_forward,
    task_slice,
)

LossFn = Callable[[Tensor, Tensor], Tensor]
Score = Literal["gradncp", "loss", "random"]
SCORES: Tuple[str, ...] = ("gradncp", "loss", "random")


def linear_head_score(
    phi: Tensor, dl_dz: Tensor, *, weight: bool = True, bias: bool = True
) -> Tensor:
    """Closed-form last-layer gradient norm for a linear head (paper Eq. 2).

    Args:
        phi: head inputs, ``(points, features)``.
        dl_dz: gradient of each point's loss w.r.t. the head output, ``(points, outputs)``.
        weight: include the weight's gradient ``dl/dz phi^T``.
        bias: include the bias's gradient ``dl/dz``.

    Returns:
        ``(points,)`` scores, in at least float32.
    """
    dtype = torch.promote_types(phi.dtype, torch.float32)
    # vector_norm reduces in one pass: no (points, features) temporary such as phi**2, so the
    # memory of the closed form does not grow with the feature width.
    g = torch.linalg.vector_norm(dl_dz, dim=-1, dtype=dtype)
    factor = torch.zeros_like(g)
    if weight:
        factor = factor + torch.linalg.vector_norm(phi, dim=-1, dtype=dtype).square()
    if bias:
        factor = factor + 1.0
    return g * factor.sqrt()


def find_head(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> str:
    """Name of the last leaf module with trainable parameters that ``model``'s forward calls.

    Args:
        model: the user's module.
        params: one task's parameters (no task dimension).
        x: a few points of one task, ``(points, ...)``.
    """
    candidates = {
        name: module
        for name, module in parametrised_modules(model)
        if not any(True for _ in module.children())
    }
    order: list = []
    with torch.no_grad(), forward_hooks(candidates, lambda name, *_: order.append(name)):
        single_forward(model, params, x)
    if not order:
        raise ValueError(
            "no linear/conv head found: the forward pass calls no leaf module with trainable "
            "parameters. Pass ContextPruner(head='<module name>') naming the last layer, or use "
            "ContextPruner(score='loss')."
        )
    return order[-1]


def resolve_head(model: nn.Module, head: str) -> nn.Module:
    """The module called ``head``, with an error that lists the valid names."""
    try:
        module = model.get_submodule(head)
    except AttributeError:
        names = [n for n, _ in parametrised_modules(model)]
        raise ValueError(
            f"`ContextPruner.head`={head!r} is not a submodule of the model; modules with "
            f"trainable parameters are {names}."
        ) from None
    if not any(p.requires_grad for p in module.parameters(recurse=False)):
        raise ValueError(
            f"`ContextPruner.head`={head!r} owns no trainable parameters; name the model's last "
            "layer (e.g. the final nn.Linear)."
        )
    return module


def _head_io(
    model: nn.Module,
    head: str,
    module: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
) -> Tuple[Tensor, Tensor]:
    """Head input ``phi`` and ``dl/dz`` for one task's points, with no graph through the body.

    A forward hook swaps the head's output for a detached leaf ``z``; the parameters are
    detached too, so autograd records only what follows the head (activation, loss).
    """
    seen: Dict[str, Tensor] = {}

    def hook(_name: str, _mod: nn.Module, inputs: tuple, output: object) -> Tensor:
        if "z" in seen:
            raise ValueError(
                f"the head module '{head}' is called more than once per forward pass; "
                "GradNCP scoring needs a single call. Name another layer with "
                "ContextPruner(head=...) or use score='loss'."
            )
        if len(inputs) != 1 or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
            raise ValueError(
                f"the head module '{head}' must take one tensor and return one tensor for "
                "GradNCP scoring; use score='loss' or name another layer with head=..."
            )
        seen["phi"] = inputs[0].detach()
        seen["z"] = output.detach().requires_grad_(True)
        return seen["z"]

    detached = {k: v.detach() for k, v in params.items()}
    with torch.enable_grad(), forward_hooks({head: module}, hook):
        out = single_forward(model, detached, x)
        losses = loss_fn(out.unsqueeze(0), y.unsqueeze(0))
        total = losses.sum()  # inside enable_grad: scoring also works under a caller's no_grad
    n = x.shape[0]
    if tuple(losses.shape) != (1, n):
        raise ValueError(
            f"`loss_fn` must return per-point losses of shape (tasks, points) = (1, {n}), got "
            f"{tuple(losses.shape)}. Pass reduction='none' or use ncp.losses.mse / cross_entropy."
        )
    if "z" not in seen:
        raise ValueError(f"the head module '{head}' was not called by the forward pass.")
    phi, z = seen["phi"], seen["z"]
    if phi.shape[0] != n or z.shape[0] != n:
        raise ValueError(
            f"the head module '{head}' must keep points as its first dimension ({n}), got input "
            f"{tuple(phi.shape)} and output {tuple(z.shape)}; use score='loss' for this model."
        )
    dz = torch.autograd.grad(total, z, allow_unused=True)[0] if total.requires_grad else None
    if dz is None:
        raise ValueError(f"the loss does not depend on the output of the head module '{head}'.")
    return phi, dz


def check_head(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    head: str,
) -> None:
    """Raise the precise error for a head GradNCP cannot score, from a few points of task 0.

    Run once at the boundary: the vectorised scorer in the loop bodies has no checks.
    """
    n = min(x.shape[1], 8)
    _head_io(
        model,
        head,
        resolve_head(model, head),
        task_slice(params, 0),
        x[0, :n].detach(),
        y[0, :n].detach(),
        loss_fn,
    )


@contextmanager
def _saved_tensor_hooks_suspended() -> Iterator[None]:
    """Pop every saved-tensor hook (a ``MemoryMeter``'s, say) for a ``torch.func`` transform.

    ``torch.func.grad`` refuses to run while such hooks are active. The per-point head
    gradients below are taken from detached inputs and nothing of them is kept for backward,
    so no hook has anything to see there; the hooks are pushed back afterwards.
    """
    ag = torch._C._autograd
    popped = []
    while (top := ag._top_saved_tensors_default_hooks(False)) is not None:
        popped.append(top)
        ag._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(popped):
            ag._push_saved_tensors_default_hooks(pack, unpack)


def _exact_head_score(
    module: nn.Module, hparams: Mapping[str, Tensor], phi: Tensor, dz: Tensor
) -> Tensor:
    """Exact per-point norm of ``d l_j / d theta_head`` through ``torch.func`` (any head type)."""

    def contracted(hp: Dict[str, Tensor], phi_j: Tensor, g_j: Tensor) -> Tensor:
        z = functional_call(module, hp, (phi_j.unsqueeze(0),)).squeeze(0)
        return (z * g_j).sum()

    hp = {k: v.detach() for k, v in hparams.items()}
    with _saved_tensor_hooks_suspended():
        per_point = vmap(grad(contracted), in_dims=(None, 0, 0))(hp, phi, dz)
    dtype = torch.promote_types(phi.dtype, torch.float32)
    sq = sum(g.flatten(1).to(dtype).pow(2).sum(1) for g in per_point.values())
    assert isinstance(sq, Tensor)
    return sq.sqrt()


class _Irregular(Exception):
    """The vectorised scorer met a model it does not handle; the task loop takes over."""


def _vmapped_linear_scores(
    model: nn.Module,
    head: str,
    module: nn.Linear,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    weight: bool,
    bias: bool,
) -> Tensor:
    """Closed-form scores of every task at once, ``(tasks, points)``, through ``vmap``.

    A forward hook adds ``delta``, a zero tensor that requires grad, to the head's output, and
    the vmapped forward returns the head's input ``phi`` beside the model output; plain
    autograd then gives ``dl/dz = dl/d delta``. Only the ops after the head depend on
    ``delta``, so the backward pass is as short as in the loop path, and since no
    ``torch.func`` transform is differentiated, saved-tensor hooks (``MemoryMeter``) still work.
    """
    static = static_tensors(model)
    tasks, points = x.shape[:2]

    def one(p: Dict[str, Tensor], xi: Tensor, di: Tensor) -> Tuple[Tensor, Tensor]:
        seen: Dict[str, Tensor] = {}

        def hook(_name: str, _mod: nn.Module, inputs: tuple, output: object) -> Tensor:
            if (
                seen
                or len(inputs) != 1
                or not isinstance(output, Tensor)
                or inputs[0].dim() != 2
                or output.shape != di.shape
            ):
                raise _Irregular
            seen["phi"] = inputs[0]
            return output + di.to(output.dtype)

        with forward_hooks({head: module}, hook):
            out = functional_call(model, {**p, **static}, (xi,))
        if not seen:
            raise _Irregular
        return out, seen["phi"]

    delta = torch.zeros(
        tasks, points, module.out_features, device=x.device, dtype=module.weight.dtype
    ).requires_grad_(True)
    with torch.enable_grad():
        out, phi = vmap(one)(dict(params), x, delta)
        losses = loss_fn(out, y)
        if tuple(losses.shape) != (tasks, points):
            raise _Irregular
        total = losses.sum()
    if not total.requires_grad:
        raise _Irregular
    (dz,) = torch.autograd.grad(total, delta)
    return linear_head_score(phi.flatten(0, 1), dz.flatten(0, 1), weight=weight, bias=bias).view(
        tasks, points
    )


def gradncp_scores(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    head: str,
    chunk_size: int | None = None,
    exact: bool = False,
    vmap_tasks: bool = False,
) -> Tensor:
    """GradNCP scores ``(tasks, points)`` for per-task ``params`` (see module docstring).

    With ``vmap_tasks`` and a linear head the closed form runs for all tasks in one vectorised
    pass (fewer, larger kernels: what a GPU wants); otherwise, or when the model does
    something the vectorised pass does not handle, a loop over tasks.
    """
    module = resolve_head(model, head)
    own = dict(module.named_parameters(recurse=False))
    closed_form = isinstance(module, nn.Linear) and not exact
    x, y = x.detach(), y.detach()
    tasks, n = x.shape[:2]
    if closed_form and vmap_tasks:
        assert isinstance(module, nn.Linear)
        names = head_params(params, head)
        detached = {k: v.detach() for k, v in params.items()}
        try:
            return torch.cat(
                [
                    _vmapped_linear_scores(
                        model,
                        head,
                        module,
                        detached,
                        x[:, sl],
                        y[:, sl],
                        loss_fn,
                        weight="weight" in names,
                        bias=own.get("bias") is not None and "bias" in names,
                    )
                    for sl in chunk_slices(n, chunk_size)
                ],
                dim=1,
            )
        except _Irregular:
            pass  # the loop below handles the model or raises the precise error
    rows = []
    for i in range(tasks):
        p_i = task_slice(params, i)
        hp = head_params(p_i, head)
        parts = []
        for sl in chunk_slices(n, chunk_size):
            phi, dz = _head_io(model, head, module, p_i, x[i, sl], y[i, sl], loss_fn)
            if closed_form and phi.dim() == 2:
                parts.append(
                    linear_head_score(
                        phi,
                        dz,
                        weight="weight" in hp,
                        bias=own.get("bias") is not None and "bias" in hp,
                    )
                )
            else:
                parts.append(_exact_head_score(module, hp, phi, dz))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def loss_scores(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    chunk_size: int | None = None,
    vmap_tasks: bool = True,
) -> Tensor:
    """Per-point losses as scores ``(tasks, points)`` (the paper's loss-based baseline)."""
    detached = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        parts = [
            loss_fn(task_forward(model, detached, x[:, sl], vmap_tasks=vmap_tasks), y[:, sl])
            for sl in chunk_slices(x.shape[1], chunk_size)
        ]
    scores = torch.cat(parts, dim=1)
    return scores.to(torch.promote_types(scores.dtype, torch.float32))


def random_scores(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform random scores ``(tasks, points)``: pruning to a random subset."""
    return torch.rand(x.shape[:2], generator=generator, device=x.device)


def score_points(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    score: str = "gradncp",
    loss_fn: LossFn,
    head: str | None = None,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    vmap_tasks: bool = True,
    exact: bool = False,
) -> Tensor:
    """Score every context point of every task; higher means more worth keeping.

    Args:
        model: the user's module.
        params: per-task parameters, ``(tasks, *shape)`` each.
        x: context inputs ``(tasks, points, ...)``.
        y: context targets ``(tasks, points, ...)``.
        score: ``"gradncp"``, ``"loss"`` or ``"random"``.
        loss_fn: per-point loss, ``(tasks, points)``.
        head: module name of the last layer for ``"gradncp"``; found automatically when None.
        chunk_size: score at most this many points per forward pass.
        generator: random source for ``"random"``.
        vmap_tasks: vectorise over tasks with ``torch.func.vmap``: the loss score, and on
            non-CPU devices the closed-form GradNCP score of a linear head.
        exact: for ``"gradncp"``, skip the closed form and differentiate the head per point.

    Returns:
        ``(tasks, points)`` scores, no graph attached.
    """
    if score == "random":
        return random_scores(x, generator)
    if score == "loss":
        return loss_scores(
            model, params, x, y, loss_fn=loss_fn, chunk_size=chunk_size, vmap_tasks=vmap_tasks
        )
    if head is None:
        head = find_head(model, task_slice(params, 0), x[0, : min(x.shape[1], 8)])
    return gradncp_scores(
        model,
        params,
        x,
        y,
        loss_fn=loss_fn,
        head=head,
        chunk_size=chunk_size,
        exact=exact,
        # One vectorised pass saves kernel launches on accelerators; on CPU the loop over
        # tasks runs plain matrix products and was faster (docs/benchmarks.md).
        vmap_tasks=vmap_tasks and x.device.type != "cpu",
    )
