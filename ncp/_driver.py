"""``meta_step`` and ``adapt``: the only module that knows the order of GradNCP's phases."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from ._checks import is_int_at_least, is_number_above
from ._config import MetaConfig
from ._distributed import unwrap
from ._inner import LR, detached_leaves, sgd_update, task_gradients, task_losses
from ._lr import LearnedLR
from ._params import (
    Params,
    adapted_names,
    check_norm_layers,
    check_params,
    init_params,
    task_forward,
)
from ._pruning import Selector
from ._rescaling import GradRescaler
from ._validation import check_device, check_finite, check_loss_fn, check_pair
from .losses import LossFn


@dataclass(frozen=True)
class MetaStepResult:
    """What :func:`meta_step` computed (``steps`` = ``cfg.inner_steps``, ``k`` = kept points).

    Attributes:
        loss: scalar outer loss, mean over tasks of ``query_loss + bootstrap_loss``; call
            ``backward()`` on it.
        query_loss: ``(tasks,)`` loss of the adapted parameters on the query set.
        bootstrap_loss: ``(tasks,)`` weighted bootstrap term, or None without bootstrap.
        inner_losses: ``(steps, tasks)`` inner loss before each step, on the points used
            (detached).
        kept_indices: ``(steps, tasks, k)`` context indices kept at each step, or None without
            pruning.
        params: adapted per-task parameters ``theta_K`` (attached to the graph).
        bootstrap_target: detached ``theta_boot``, or None without bootstrap.
    """

    loss: Tensor
    query_loss: Tensor
    bootstrap_loss: Tensor | None
    inner_losses: Tensor
    kept_indices: Tensor | None
    params: Params
    bootstrap_target: Params | None


@dataclass(frozen=True)
class AdaptResult:
    """What :func:`adapt` computed (``steps`` test-time steps, ``k`` kept points).

    Attributes:
        params: detached adapted per-task parameters ``{name: (tasks, *shape)}``; evaluate
            them with :func:`ncp.forward`.
        losses: ``(steps, tasks)`` loss before each step, on the points the step used (the
            full context, or the pruned one with ``mode="pruned"``).
        kept_indices: ``(steps, tasks, k)`` context points the pruner chose at each step
            (``mode="pruned"`` or ``"rescaled"``), else None.
    """

    params: Params
    losses: Tensor
    kept_indices: Tensor | None


Mode = Union[Literal["full", "pruned", "rescaled"], GradRescaler]
"""Test-time adaptation: full-context steps, pruned-context steps, or full-context steps
rescaled by a :class:`GradRescaler` (``"rescaled"`` is ``GradRescaler()``)."""
MODES = ("full", "pruned", "rescaled")


def _unpack(batch: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 4):
        got = (
            f"{type(batch).__name__} of length {len(batch)}"
            if isinstance(batch, (tuple, list))
            else type(batch).__name__
        )
        raise ValueError(
            "`batch` must be (x, y) (query = the full context, as for neural fields) or "
            f"(context_x, context_y, query_x, query_y), got {got}."
        )
    if len(batch) == 2:
        x, y = batch
        check_pair(x, y)
        return x, y, x, y
    cx, cy, qx, qy = batch
    check_pair(cx, cy, ("context_x", "context_y"))
    check_pair(qx, qy, ("query_x", "query_y"))
    if cx.shape[0] != qx.shape[0]:
        raise ValueError(
            f"context and query must have the same number of tasks, got {cx.shape[0]} and "
            f"{qx.shape[0]}."
        )
    return cx, cy, qx, qy


def _check_learned_lr(
    learned_lr: LearnedLR | None, names: list[str], steps: int
) -> LearnedLR | None:
    """Validate the learned rates (unwrapping a DDP wrapper: ncp averages their gradients)."""
    if learned_lr is None:
        return None
    if isinstance(learned_lr, DistributedDataParallel):
        learned_lr = learned_lr.module
    if not isinstance(learned_lr, LearnedLR):
        raise TypeError(
            f"`learned_lr` must be an ncp.LearnedLR or None, got {type(learned_lr).__name__}."
        )
    learned_lr.check(names)
    if learned_lr.steps < steps:
        raise ValueError(
            f"`learned_lr` has rates for {learned_lr.steps} steps but cfg.inner_steps={steps}; "
            f"build it with ncp.LearnedLR(model, steps={steps})."
        )
    return learned_lr


def _selector(
    cfg: MetaConfig, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, params: Params
) -> Selector | None:
    """``cfg.pruner`` prepared for this model, loss and context (None without a pruner)."""
    if cfg.pruner is None:
        return None
    return cfg.pruner.prepare(
        model,
        x,
        y,
        loss_fn=loss_fn,
        params=params,
        chunk_size=cfg.chunk_size,
        vmap_tasks=cfg.vmap_tasks,
    )


def _target_selector(
    cfg: MetaConfig,
    select: Selector | None,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    params: Params,
) -> Selector | None:
    """The selector of the bootstrap target's steps (``BootstrapMetaLoss.context``)."""
    assert cfg.bootstrap is not None
    if cfg.bootstrap.context == "pruned":
        return select
    if cfg.bootstrap.context == "random":
        assert cfg.pruner is not None
        randomly = dataclasses.replace(
            cfg.pruner, score="random", score_dtype=None, strategy="auto"
        )
        return randomly.prepare(model, x, y, loss_fn=loss_fn, params=params)
    return None


def _step_lr(
    inner_lr: float,
    learned_lr: LearnedLR | None,
    step: int,
    names: list[str],
    wrap: Callable[[Tensor], Tensor] | None = None,
) -> LR:
    """The learning rate of inner step ``step``: ``cfg.inner_lr`` or the learned rates."""
    if learned_lr is None:
        return inner_lr
    rates = {n: learned_lr.rate(step, n) for n in names}
    return rates if wrap is None else {n: wrap(r) for n, r in rates.items()}


def _inner_step(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    lr: LR,
    cfg: MetaConfig,
    names: Sequence[str],
) -> Tuple[Params, Tensor]:
    """One inner SGD step of every task on ``(x, y)``: the new parameters (differentiable
    unless ``cfg.first_order``) and the ``(tasks,)`` losses before the step."""
    grads, loss = task_gradients(
        model,
        detached_leaves(params) if cfg.first_order else params,
        x,
        y,
        loss_fn,
        create_graph=not cfg.first_order,
        vmap_tasks=cfg.vmap_tasks,
        names=names,
    )
    return sgd_update(params, grads, lr), loss


def _recomputed_step(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    lr: LR,
    cfg: MetaConfig,
    names: Sequence[str],
) -> Tuple[Params, Tensor]:
    """:func:`_inner_step` under activation checkpointing: only its inputs are saved for
    ``backward``, which recomputes the step's forward pass and gradient graph (exactly: the
    same operations on the same inputs) when it reaches it."""
    keys = list(params)

    def step(xs: Tensor, ys: Tensor, *values: Tensor) -> Tuple[Tensor, ...]:
        new, loss = _inner_step(
            model, dict(zip(keys, values, strict=True)), xs, ys, loss_fn, lr, cfg, names
        )
        return (*(new[k] for k in keys), loss)

    out = checkpoint(step, x, y, *params.values(), use_reentrant=False)
    return dict(zip(keys, out[:-1], strict=True)), out[-1]


def meta_step(
    model: nn.Module,
    batch: Sequence[Tensor],
    cfg: MetaConfig,
    *,
    loss_fn: LossFn | None = None,
    learned_lr: LearnedLR | None = None,
) -> MetaStepResult:
    """Adapt ``model`` to every task of ``batch`` and return the outer (meta) loss.

    Runs ``cfg.inner_steps`` differentiable SGD steps per task, each on the context points
    kept by ``cfg.pruner`` (all points when None), then the loss of the adapted parameters on
    the query set plus, with ``cfg.bootstrap``, the bootstrap term (paper Algorithm 1). It
    never calls ``backward`` or an optimizer and writes nothing on ``model``.

    Args:
        model: any ``nn.Module`` mapping ``(points, ...)`` inputs to ``(points, ...)``
            outputs; its parameters with ``requires_grad=True`` are adapted.
        batch: ``(x, y)``, the query set being the full context (neural fields), or
            ``(context_x, context_y, query_x, query_y)``; shapes ``(tasks, points, ...)``.
        cfg: the configuration.
        loss_fn: per-point loss ``(pred, target) -> (tasks, points)``; default
            ``cfg.loss_fn``.
        learned_lr: meta-learned inner learning rates (Meta-SGD) replacing ``cfg.inner_lr``.

    A ``DistributedDataParallel``-wrapped model is unwrapped and its meta-gradients are
    averaged across ranks during ``backward``.

    Returns:
        A :class:`MetaStepResult`; ``result.loss.backward()`` gives the meta-gradient.

    Raises:
        ValueError: on mismatched shapes or devices, a loss that is not per-point, a ratio
            keeping no point, batch norm with running statistics, or an unused parameter.
        FloatingPointError: when an inner loss is NaN or infinite.

    Example:
        >>> import torch, ncp
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> cfg = ncp.MetaConfig(inner_steps=2, pruner=ncp.ContextPruner(ratio=0.5))
        >>> out = ncp.meta_step(model, (torch.rand(4, 32, 2), torch.rand(4, 32, 1)), cfg)
        >>> out.loss.backward()
        >>> out.inner_losses.shape, out.kept_indices.shape
        (torch.Size([2, 4]), torch.Size([2, 4, 16]))

    References:
        Tack et al., NeurIPS 2023, Algorithm 1.
    """
    if not isinstance(cfg, MetaConfig):
        raise TypeError(f"`cfg` must be an ncp.MetaConfig, got {type(cfg).__name__}.")
    if not torch.is_grad_enabled():
        raise RuntimeError(
            "ncp.meta_step builds the graph of the inner loop for the meta-gradient, but "
            "gradients are disabled here (torch.no_grad() or torch.inference_mode()); call it "
            "with gradients enabled. For evaluation use ncp.adapt, which runs under no_grad."
        )
    cx, cy, qx, qy = _unpack(batch)
    loss_fn = cfg.loss_fn if loss_fn is None else loss_fn
    model, wrap = unwrap(model, meta_gradients=True)
    check_device(model, cx, cy, qx, qy)
    check_norm_layers(model)
    names = adapted_names(model, cfg.adapt_only)
    learned_lr = _check_learned_lr(learned_lr, names, cfg.inner_steps)
    tasks = cx.shape[0]
    params = init_params(model, tasks, wrap=wrap)
    check_loss_fn(model, params, cx, cy, loss_fn, cfg.vmap_tasks)
    select = _selector(cfg, model, cx, cy, loss_fn, params)

    inner, kept = [], []
    for step in range(cfg.inner_steps):
        x_k, y_k = cx, cy
        if select is not None:
            x_k, y_k, idx = select(params, cx, cy)
            kept.append(idx)
        lr = _step_lr(cfg.inner_lr, learned_lr, step, names, wrap)
        take_step = _recomputed_step if cfg.recompute_steps else _inner_step
        params, step_loss = take_step(model, params, x_k, y_k, loss_fn, lr, cfg, names)
        inner.append(step_loss.detach())
    inner_losses = torch.stack(inner)
    if cfg.check_finite:
        check_finite(inner_losses, "inner")

    # The bootstrap target is built before the query pass: its transient full-context graph
    # is then freed before the query graph exists, so the two never add up in the peak.
    boot_loss, target = None, None
    if cfg.bootstrap is not None:
        boot_loss, target = cfg.bootstrap(
            model,
            params,
            cx,
            cy,
            loss_fn=loss_fn,
            vmap_tasks=cfg.vmap_tasks,
            names=names,
            chunk_size=cfg.chunk_size,
            select=_target_selector(cfg, select, model, cx, cy, loss_fn, params),
        )
    query_loss = task_losses(
        model, params, qx, qy, loss_fn, vmap_tasks=cfg.vmap_tasks, chunk_size=cfg.chunk_size
    )
    total = query_loss if boot_loss is None else query_loss + boot_loss.to(query_loss.dtype)
    return MetaStepResult(
        loss=total.mean(),
        query_loss=query_loss,
        bootstrap_loss=boot_loss,
        inner_losses=inner_losses,
        kept_indices=torch.stack(kept) if kept else None,
        params=params,
        bootstrap_target=target,
    )


def _adapt_setup(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: MetaConfig,
    mode: Mode,
    steps: int | None,
    lr: float | None,
    learned_lr: LearnedLR | None,
) -> Tuple[nn.Module, GradRescaler | None, int, float, LearnedLR | None, list[str]]:
    """Validate :func:`adapt`'s arguments; the unwrapped model, rescaler, steps, lr, learned
    rates and adapted parameter names."""
    if not isinstance(cfg, MetaConfig):
        raise TypeError(f"`cfg` must be an ncp.MetaConfig, got {type(cfg).__name__}.")
    check_pair(x, y)
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "ncp.adapt takes gradients of the inner loss, which torch.inference_mode() forbids; "
            "wrap the call in torch.no_grad() instead (adapt enables gradients internally and "
            "returns detached parameters)."
        )
    if not isinstance(mode, GradRescaler) and mode not in MODES:
        raise ValueError(
            f"`mode` must be 'full', 'pruned', 'rescaled' or an ncp.GradRescaler, got {mode!r}."
        )
    rescaler = GradRescaler() if mode == "rescaled" else mode
    if mode != "full" and cfg.pruner is None:
        raise ValueError(
            f"mode={mode!r} needs `cfg.pruner` to choose the pruned context; pass a MetaConfig "
            "with pruner=ncp.ContextPruner(...), or use mode='full'."
        )
    model, _ = unwrap(model, meta_gradients=False)
    check_device(model, x, y)
    check_norm_layers(model)
    names = adapted_names(model, cfg.adapt_only)
    if learned_lr is not None and lr is not None:
        raise ValueError("pass either `lr` or `learned_lr` to ncp.adapt, not both.")
    learned_lr = _check_learned_lr(learned_lr, names, 1)
    steps = cfg.inner_steps if steps is None else steps
    lr = cfg.inner_lr if lr is None else lr
    if not is_int_at_least(steps, 0):
        raise ValueError(f"`steps` must be an int >= 0, got {steps!r}.")
    if not is_number_above(lr):
        raise ValueError(f"`lr` must be a number > 0, got {lr!r}.")
    return (
        model,
        rescaler if isinstance(rescaler, GradRescaler) else None,
        steps,
        lr,
        learned_lr,
        names,
    )


def adapt(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: MetaConfig,
    *,
    mode: Mode = "full",
    steps: int | None = None,
    lr: float | None = None,
    params: Params | None = None,
    loss_fn: LossFn | None = None,
    learned_lr: LearnedLR | None = None,
) -> AdaptResult:
    """Test-time adaptation (paper Algorithm 2): first-order SGD with no graph.

    Args:
        model: the meta-learned module.
        x: context inputs ``(tasks, points, ...)``.
        y: context targets ``(tasks, points, ...)``.
        cfg: the configuration used for meta-training (pruner, loss, default steps and lr).
        mode: ``"full"`` steps on the full context (the default; Algorithm 2);
            ``"rescaled"`` steps on the full context with each gradient rescaled to the norm
            of the gradient on the context ``cfg.pruner`` keeps, matching the step sizes seen
            in meta-training (Eq. 4; pass ``ncp.GradRescaler(mode="loss")`` for the loss-ratio
            variant); ``"pruned"`` steps on the pruned context itself, as in meta-training
            (the paper's Fig. 11).
        steps: number of steps; default ``cfg.inner_steps``.
        lr: learning rate; default ``cfg.inner_lr``.
        params: per-task parameters to start from; default the model's own.
        loss_fn: per-point loss; default ``cfg.loss_fn``.
        learned_lr: meta-learned rates (Meta-SGD) used instead of ``lr``; steps past their
            horizon reuse the last learned rate. Each call starts the schedule at its own
            step 0, so two calls chained through ``params`` are not one longer call: adapt
            once with the total ``steps`` instead.

    Returns:
        An :class:`AdaptResult`: the detached adapted ``params`` (evaluate them with
        :func:`ncp.forward`), and the per-step ``losses`` and ``kept_indices``.

    Example:
        >>> import torch, ncp
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> x, y = torch.rand(2, 64, 2), torch.rand(2, 64, 1)
        >>> out = ncp.adapt(model, x, y, ncp.MetaConfig(), steps=3, mode="rescaled")
        >>> ncp.forward(model, out.params, x).shape, out.kept_indices.shape
        (torch.Size([2, 64, 1]), torch.Size([3, 2, 16]))
    """
    model, rescaler, steps, lr, learned_lr, names = _adapt_setup(
        model, x, y, cfg, mode, steps, lr, learned_lr
    )
    loss_fn = cfg.loss_fn if loss_fn is None else loss_fn
    tasks = x.shape[0]
    if params is None:
        current = init_params(model, tasks, detach=True)
    else:
        check_params(model, params, tasks)
        current = {k: v.detach() for k, v in params.items()}
    check_loss_fn(model, current, x, y, loss_fn, cfg.vmap_tasks)
    select = None if mode == "full" else _selector(cfg, model, x, y, loss_fn, current)
    history, kept = [], []
    for step in range(steps):
        with torch.enable_grad():
            x_k, y_k = x, y
            if select is not None:
                x_k, y_k, idx = select(current, x, y)
                kept.append(idx)
            on_kept = mode == "pruned"
            grads, loss = task_gradients(
                model,
                detached_leaves(current),
                x_k if on_kept else x,
                y_k if on_kept else y,
                loss_fn,
                create_graph=False,
                vmap_tasks=cfg.vmap_tasks,
                names=names,
                chunk_size=cfg.chunk_size,
            )
            if rescaler is not None:
                grads = rescaler.rescale(
                    model,
                    current,
                    grads,
                    x_k,
                    y_k,
                    loss_fn=loss_fn,
                    full_loss=loss,
                    vmap_tasks=cfg.vmap_tasks,
                    chunk_size=cfg.chunk_size,
                )
        with torch.no_grad():
            current = sgd_update(current, grads, _step_lr(lr, learned_lr, step, names))
        history.append(loss.detach())
    losses_t = torch.stack(history) if history else x.new_zeros(0, tasks)
    if cfg.check_finite:
        check_finite(losses_t, "adaptation")
    return AdaptResult(current, losses_t, torch.stack(kept) if kept else None)


def forward(model: nn.Module, params: Params, x: Tensor, *, vmap_tasks: bool = True) -> Tensor:
    """Evaluate ``model`` with per-task ``params`` on ``x`` ``(tasks, points, ...)``.

    Args:
        model: the module the parameters belong to.
        params: per-task parameters from :func:`adapt` or ``MetaStepResult.params``.
        x: inputs ``(tasks, points, ...)``.
        vmap_tasks: vectorise over tasks (``False``: a loop).

    Returns:
        Outputs ``(tasks, points, ...)``.

    Example:
        >>> import torch, ncp
        >>> model = torch.nn.Linear(2, 3)
        >>> params = ncp.adapt(model, torch.rand(2, 5, 2), torch.rand(2, 5, 3), ncp.MetaConfig(pruner=None), steps=1).params
        >>> ncp.forward(model, params, torch.rand(2, 7, 2)).shape
        torch.Size([2, 7, 3])
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"`x` must be a tensor of shape (tasks, points, ...), got {got}.")
    model, _ = unwrap(model, meta_gradients=False)
    check_params(model, params, x.shape[0])
    check_device(model, x)
    return task_forward(model, params, x, vmap_tasks=vmap_tasks)
