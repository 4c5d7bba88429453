"""Per-point importance scores (never selection: see ``_pruning``).

The GradNCP score of a context point is the norm of the gradient of that point's loss with
respect to the parameters of the model's last layer (the *head*), paper Eq. (2) and Appendix B.
For a linear head ``z = W phi + b`` the per-point gradient is ``dl/dz phi^T`` for ``W`` and
``dl/dz`` for ``b``, so its norm factorises without building any per-point gradient tensor:

    ||g|| = ||dl/dz|| * sqrt(||phi||^2 + 1)

``dl/dz`` comes from autograd through whatever follows the head (an activation, the loss), so
the same code covers MSE, a sigmoid after the head and cross-entropy. Other head types get the
exact per-point gradient norm of their parameters. How a model is scored is decided once per
configuration (:func:`plan`), never retried in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Mapping, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ._gain import gain_scores
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
from .losses import LossFn

Score = Literal["gradncp", "loss", "random", "spg", "tpg"]
SCORES: Tuple[str, ...] = ("gradncp", "loss", "random", "spg", "tpg")


def linear_head_score(
    phi: Tensor, dl_dz: Tensor, *, weight: bool = True, bias: bool = True
) -> Tensor:
    """Closed-form last-layer gradient norm for a linear head (paper Eq. 2).

    A head applied to several feature vectors per point (``phi`` ``(points, ..., features)``,
    such as the samples along a NeRF ray) has the per-point gradient
    ``sum_i dl/dz_i phi_i^T`` for ``W`` and ``sum_i dl/dz_i`` for ``b``, no longer rank one: its
    norm is computed from that ``(points, outputs, features)`` sum, still without a per-point
    copy of the parameters.

    Args:
        phi: head inputs, ``(points, features)`` or ``(points, ..., features)``.
        dl_dz: gradient of each point's loss w.r.t. the head output, ``(points, outputs)``, or
            ``(points, ..., outputs)`` matching ``phi``.
        weight: include the weight's gradient ``dl/dz phi^T``.
        bias: include the bias's gradient ``dl/dz``.

    Returns:
        ``(points,)`` scores, in at least float32.
    """
    dtype = torch.promote_types(phi.dtype, torch.float32)
    if phi.dim() > 2:
        phi_i, dz_i = phi.flatten(1, -2).to(dtype), dl_dz.flatten(1, -2).to(dtype)
        sq = torch.zeros(phi.shape[0], device=phi.device, dtype=dtype)
        if weight:
            sq = sq + torch.einsum("pik,pif->pkf", dz_i, phi_i).square().sum((1, 2))
        if bias:
            sq = sq + dz_i.sum(1).square().sum(1)
        return sq.sqrt()
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
) -> Tuple[Tensor, Tensor, Tensor]:
    """Head input ``phi``, ``dl/dz`` and the head output ``z`` for one task's points, with no
    graph through the body.

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
    return phi, dz, z.detach()


def _exact_head_score(
    module: nn.Module, hparams: Mapping[str, Tensor], phi: Tensor, dz: Tensor
) -> Tensor:
    """Exact per-point norm of ``d l_j / d theta_head`` for any head type.

    Every point gets its own copy of the head's parameters (an ``expand``, no copy), the head
    runs on all points at once through ``vmap``, and one plain ``autograd.grad`` of
    ``sum_j z_j . dl/dz_j`` gives each copy the gradient of its own point. No ``torch.func``
    transform is differentiated, so saved-tensor hooks (``MemoryMeter``) stay active.
    """
    n = phi.shape[0]
    copies = {
        k: v.detach().unsqueeze(0).expand(n, *v.shape).requires_grad_(True)
        for k, v in hparams.items()
    }

    def one(hp: Dict[str, Tensor], phi_j: Tensor) -> Tensor:
        return functional_call(module, hp, (phi_j.unsqueeze(0),)).squeeze(0)

    with torch.enable_grad():
        z = vmap(one)(copies, phi.detach())
        per_point = torch.autograd.grad((z * dz).sum(), list(copies.values()))
    dtype = torch.promote_types(phi.dtype, torch.float32)
    sq = sum(g.flatten(1).to(dtype).pow(2).sum(1) for g in per_point)
    assert isinstance(sq, Tensor)
    return sq.sqrt()


class _Irregular(Exception):
    """The vectorised scorer met a model it does not handle (decided once, in ``plan``)."""


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


Strategy = Literal["auto", "loop", "vmap", "exact"]
STRATEGIES: Tuple[str, ...] = ("auto", "loop", "vmap", "exact")


@dataclass(frozen=True)
class ScorePlan:
    """How the points of one model, loss and context are scored, decided once.

    ``method`` is ``"random"``, ``"loss"``, or for the GradNCP score ``"loop"`` (closed form of
    Eq. 2, task by task), ``"vmap"`` (the closed form for all tasks in one vectorised pass) or
    ``"exact"`` (the per-point gradient of a head that is not linear).
    """

    score: str
    method: str
    head: str | None = None
    weight: bool = True
    bias: bool = True
    vmap_tasks: bool = True
    lr: float = 0.0

    def __call__(
        self,
        model: nn.Module,
        params: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        *,
        loss_fn: LossFn,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Scores ``(tasks, points)`` with no graph attached; no checks (see :func:`plan`)."""
        if self.method == "random":
            return random_scores(x, generator)
        if self.method == "loss":
            return loss_scores(
                model,
                params,
                x,
                y,
                loss_fn=loss_fn,
                chunk_size=chunk_size,
                vmap_tasks=self.vmap_tasks,
            )
        assert self.head is not None
        module = model.get_submodule(self.head)
        detached = {k: v.detach() for k, v in params.items()}
        x, y = x.detach(), y.detach()
        slices = chunk_slices(x.shape[1], chunk_size)
        if self.method == "vmap":
            assert isinstance(module, nn.Linear)
            parts = [
                _vmapped_linear_scores(
                    model,
                    self.head,
                    module,
                    detached,
                    x[:, sl],
                    y[:, sl],
                    loss_fn,
                    weight=self.weight,
                    bias=self.bias,
                )
                for sl in slices
            ]
            return torch.cat(parts, dim=1)
        if self.method in ("spg", "tpg"):
            head = self.head
            return gain_scores(
                self.method,
                lambda p, xs, ys: _head_io(model, head, module, p, xs, ys, loss_fn),
                detached,
                x,
                y,
                loss_fn=loss_fn,
                lr=self.lr,
                weight=self.weight,
                bias=self.bias,
                chunk_size=chunk_size,
            )
        rows = []
        for i in range(x.shape[0]):
            p_i = task_slice(detached, i)
            hp = head_params(p_i, self.head)
            parts = []
            for sl in slices:
                phi, dz, _ = _head_io(model, self.head, module, p_i, x[i, sl], y[i, sl], loss_fn)
                if self.method == "loop":
                    parts.append(linear_head_score(phi, dz, weight=self.weight, bias=self.bias))
                else:
                    parts.append(_exact_head_score(module, hp, phi, dz))
            rows.append(torch.cat(parts))
        return torch.stack(rows)


# On CPU, scoring every task in one vectorised pass beats a loop over tasks while the batched
# activations stay small (the loop's fixed cost per task dominates: at 10 points and 25 tasks
# the loop took 10x the vectorised time); once tasks x points x the widest per-point feature
# passes about 2**20 elements the loop's plain matrix products win (1.3-1.9x at 2-4M elements).
# Measured with benchmarks/bench_small.py and docs/benchmarks.md ("Small contexts").
CPU_VMAP_ELEMENTS = 2**20


def _widest_features(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> int:
    """The largest per-point size of any leaf module's output in one forward pass of the
    points ``x`` (no task dimension): the width of the activations a vectorised pass batches."""
    n = x.shape[0]
    sizes = [1]

    def record(_module: nn.Module, _inputs: object, out: object) -> None:
        if isinstance(out, Tensor) and out.dim() >= 1 and out.shape[0] == n:
            sizes.append(out[0].numel())

    handles = [
        m.register_forward_hook(record) for m in model.modules() if next(m.children(), None) is None
    ]
    try:
        with torch.no_grad():
            single_forward(model, params, x.detach())
    finally:
        for h in handles:
            h.remove()
    return max(sizes)


def plan(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    score: str,
    loss_fn: LossFn,
    head: str | None = None,
    strategy: str = "auto",
    vmap_tasks: bool = True,
    gain_lr: float = 1e-2,
) -> ScorePlan:
    """Validate the model and loss for ``score`` on a few points and choose how to score.

    For ``"gradncp"``: the head is found (or checked) and run once on a few points of task 0,
    which raises the precise error for a head that cannot be scored; ``strategy="auto"``
    vectorises the closed form over tasks on accelerators (where one pass saves kernel
    launches) and on CPU while ``tasks x points x`` the widest per-point activation is at most
    :data:`CPU_VMAP_ELEMENTS` (small contexts, where a loop's cost per task dominates); larger
    CPU work loops over tasks (plain matrix products, measured faster there,
    docs/benchmarks.md); ``"vmap"`` vectorises on any device; ``"loop"`` never does;
    ``"exact"`` differentiates the head per point even when it is linear. A model the
    vectorised pass does not handle (a linear head applied to several feature vectors per
    point, say) is found here, once, and scored task by task with the closed form.
    """
    if score == "random":
        return ScorePlan(score, "random")
    if score == "loss":
        return ScorePlan(score, "loss", vmap_tasks=vmap_tasks)
    if head is None:
        head = find_head(model, task_slice(params, 0), x[0, : min(x.shape[1], 8)])
    module = resolve_head(model, head)
    n = min(x.shape[1], 8)
    phi, _, z = _head_io(
        model, head, module, task_slice(params, 0), x[0, :n].detach(), y[0, :n].detach(), loss_fn
    )
    own = dict(module.named_parameters(recurse=False))
    names = head_params(params, head)
    weight = "weight" in names
    bias = own.get("bias") is not None and "bias" in names
    if score in ("spg", "tpg"):
        out = single_forward(model, task_slice(params, 0), x[0, :n].detach())
        if (
            not isinstance(module, nn.Linear)
            or phi.dim() != 2
            or out.shape != z.shape
            or not torch.allclose(out, z.to(out.dtype))
        ):
            raise ValueError(
                f"score={score!r} approximates the gain with a last-layer update and needs a "
                "linear head whose output is the model's output (points, outputs); use "
                "score='gradncp' for this model."
            )
        return ScorePlan(score, score, head, weight, bias, lr=gain_lr)
    closed_form = isinstance(module, nn.Linear) and strategy != "exact"
    if not closed_form:
        return ScorePlan(score, "exact", head, weight, bias)
    vectorise = strategy == "vmap" or (
        strategy == "auto"
        and vmap_tasks
        and (
            x.device.type != "cpu"
            or x.shape[0] * x.shape[1] * _widest_features(model, task_slice(params, 0), x[0, :n])
            <= CPU_VMAP_ELEMENTS
        )
    )
    if vectorise:
        assert isinstance(module, nn.Linear)
        detached = {k: v.detach() for k, v in params.items()}
        try:
            _vmapped_linear_scores(
                model,
                head,
                module,
                detached,
                x[:, :n].detach(),
                y[:, :n].detach(),
                loss_fn,
                weight=weight,
                bias=bias,
            )
        except _Irregular:
            vectorise = False
    return ScorePlan(score, "vmap" if vectorise else "loop", head, weight, bias)


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
    strategy: str = "auto",
) -> Tensor:
    """Score every context point of every task; higher means more worth keeping.

    A one-off call: it validates and plans (:func:`plan`) every time. Loops should use
    :meth:`ncp.ContextPruner.prepare`, which plans once.

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
        vmap_tasks: vectorise the loss score over tasks with ``torch.func.vmap``, and allow
            ``strategy="auto"`` to vectorise the GradNCP score on accelerators.
        strategy: how the GradNCP score is computed: ``"auto"``, ``"loop"``, ``"vmap"`` or
            ``"exact"`` (see :attr:`ncp.ContextPruner.strategy`).

    Returns:
        ``(tasks, points)`` scores, no graph attached.
    """
    how = plan(
        model,
        params,
        x,
        y,
        score=score,
        loss_fn=loss_fn,
        head=head,
        strategy=strategy,
        vmap_tasks=vmap_tasks,
    )
    return how(model, params, x, y, loss_fn=loss_fn, chunk_size=chunk_size, generator=generator)
