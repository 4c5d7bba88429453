"""GradNCP inside a `higher <https://github.com/facebookresearch/higher>`_ inner loop.

higher unrolls an inner loop on ``fmodel``, a patched copy of the model whose *fast weights* a
differentiable optimizer ``diffopt`` updates. These functions add GradNCP to such a loop:

- :func:`prune` keeps the context points for the next ``diffopt.step``, scored at the current
  fast weights (Sec. 2.2);
- :func:`bootstrap_loss` is the bootstrap term of the fast weights (Sec. 2.3), whose gradient
  reaches the initial weights through them;
- :func:`rescale_callback` is a ``grad_callback`` for ``diffopt.step`` that rescales test-time
  full-context gradients to the pruned gradient's norm (Sec. 2.4, Eq. 4);
- :func:`fast_params` returns the fast weights as an ncp per-task parameter dict.

Each takes the original ``model``, which gives the parameter names and is the module ncp runs
with ``torch.func.functional_call``, and higher's ``fmodel``, which holds the current fast
weights, one per ``model.parameters()`` entry and in that order. Data are one task at a time,
``x`` ``(points, ...)`` and ``y`` ``(points, ...)``, as in a higher loop. Frozen parameters
(``requires_grad=False``) and buffers are read from ``model``, as everywhere in ncp.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

try:
    import higher
except ImportError as err:
    raise ImportError(
        "`ncp.interop.higher` needs the optional dependency 'higher': pip install \"ncp[higher]\""
    ) from err

from .. import losses
from .._bootstrap import BootstrapMetaLoss
from .._params import Params, adapted_names, as_adapt_only, check_norm_layers
from .._pruning import ContextPruner, Pruned, Selector
from .._rescaling import GradRescaler
from .._validation import check_device, check_loss_fn
from ..losses import LossFn

__all__ = ["bootstrap_loss", "fast_params", "prune", "rescale_callback"]

GradCallback = Callable[[Sequence[Tensor | None]], List[Tensor | None]]
"""higher's ``grad_callback``: gradients in ``model.parameters()`` order (None where a
parameter got none) to the gradients ``diffopt`` applies."""


# --- checks at the boundary --------------------------------------------------------------------


def _fast_weights(model: nn.Module, fmodel: nn.Module) -> Dict[str, Tensor]:
    """The current fast weights of the trainable parameters, by name, graph kept."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    # higher.patch._MonkeyPatchBase is the base of every module higher patches; higher 0.2.1 is
    # the last release, so this private name is stable.
    if not isinstance(fmodel, higher.patch._MonkeyPatchBase):
        raise TypeError(
            "`fmodel` must be the patched module from `with higher.innerloop_ctx(model, opt) as "
            f"(fmodel, diffopt)` or higher.monkeypatch(model), got {type(fmodel).__name__}."
        )
    fast = fmodel.fast_params
    if fast is None:
        raise ValueError(
            "`fmodel` holds no fast weights; create it with higher.innerloop_ctx(model, opt) or "
            "higher.monkeypatch(model), not higher.patch.make_functional."
        )
    named = list(model.named_parameters())
    if len(fast) != len(named):
        raise ValueError(
            f"`fmodel` has {len(fast)} fast weights but `model` has {len(named)} parameters; "
            "pass the module that you gave to higher.innerloop_ctx."
        )
    for (name, p), f in zip(named, fast, strict=True):
        if f.shape != p.shape:
            raise ValueError(
                f"the fast weight of '{name}' has shape {tuple(f.shape)} but the parameter has "
                f"{tuple(p.shape)}; pass the module that you gave to higher.innerloop_ctx."
            )
        if not p.requires_grad and f.device == p.device and not torch.equal(f, p):
            raise ValueError(
                f"the fast weight of the frozen parameter '{name}' differs from the model's, "
                "which ncp reads it from. higher with track_higher_grads=False updates frozen "
                "parameters that the inner optimizer holds: build it over the trainable ones, "
                "torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=...), "
                "or step with grad_callback=ncp.interop.higher.rescale_callback(...), which "
                "leaves them unchanged."
            )
    return {name: f for (name, p), f in zip(named, fast, strict=True) if p.requires_grad}


def _check_task(model: nn.Module, x: object, y: object) -> None:
    """``x`` and ``y`` are one task's points on the model's device."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() < 1:
            raise ValueError(f"`{name}` must have shape (points, ...), got {tuple(t.shape)}.")
    assert isinstance(x, Tensor) and isinstance(y, Tensor)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"`x` and `y` must hold the same points, got shapes {tuple(x.shape)} and "
            f"{tuple(y.shape)}. ncp.interop.higher takes one task at a time: (points, ...)."
        )
    if x.shape[0] == 0:
        raise ValueError(f"`x` has no points: shape {tuple(x.shape)}.")
    check_device(model, x, y)
    check_norm_layers(model)


def _adapted(model: nn.Module, adapt_only: Sequence[str] | None) -> List[str]:
    return adapted_names(model, as_adapt_only(adapt_only, "adapt_only"), "adapt_only")


def _check_type(value: object, cls: type, arg: str) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"`{arg}` must be an ncp.{cls.__name__}, got {type(value).__name__}.")


# --- the loop bodies -------------------------------------------------------------------------


def _one_task(params: Dict[str, Tensor]) -> Params:
    return {k: v.unsqueeze(0) for k, v in params.items()}


def _prepared(
    model: nn.Module, params: Params, x: Tensor, y: Tensor, pruner: object, loss_fn: LossFn
) -> Selector:
    """A selector for one task ``(points, ...)``: ``pruner`` prepared once here, or a
    :class:`ncp.Selector` the caller prepared for this model and context size."""
    if isinstance(pruner, Selector):
        if pruner.model is not model:
            raise ValueError(
                "`pruner` is a Selector prepared for another model; prepare it with "
                "pruner.prepare(model, x[None], y[None], ...) for the `model` given here."
            )
        if pruner.points != x.shape[0]:
            raise ValueError(
                f"`pruner` is a Selector prepared for {pruner.points} context points but `x` "
                f"holds {x.shape[0]}; prepare it for this context."
            )
        return pruner
    _check_type(pruner, ContextPruner, "pruner")
    assert isinstance(pruner, ContextPruner)
    check_loss_fn(model, params, x[None], y[None], loss_fn, vmap_tasks=False)
    return pruner.prepare(model, x[None], y[None], loss_fn=loss_fn, params=params, vmap_tasks=False)


def _kept(selector: Selector, params: Params, x: Tensor, y: Tensor) -> Pruned:
    """The kept points of one task at ``params``, without the task dimension."""
    kept = selector(params, x[None], y[None])
    return Pruned(kept.x[0], kept.y[0], kept.indices[0])


def fast_params(model: nn.Module, fmodel: nn.Module) -> Params:
    """The current fast weights of ``fmodel`` as ncp per-task parameters of one task.

    Args:
        model: the module given to ``higher.innerloop_ctx``.
        fmodel: the patched module it yields.

    Returns:
        ``{name: (1, *parameter.shape)}`` for every trainable parameter of ``model``, still
        attached to higher's graph, ready for :func:`ncp.forward` and :mod:`ncp.functional`
        with ``x.unsqueeze(0)``.

    Raises:
        TypeError: when ``fmodel`` is not a module patched by higher.
        ValueError: when ``fmodel`` does not patch ``model``, or when the fast weight of a
            frozen parameter no longer equals the parameter.

    Example:
        >>> import torch, higher, ncp
        >>> from ncp.interop.higher import fast_params
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        ...     params = fast_params(model, fmodel)
        >>> params["weight"].shape, params["weight"].requires_grad
        (torch.Size([1, 1, 2]), True)
    """
    return _one_task(_fast_weights(model, fmodel))


def prune(
    model: nn.Module,
    fmodel: nn.Module,
    x: Tensor,
    y: Tensor,
    pruner: ContextPruner | Selector,
    *,
    loss_fn: LossFn = losses.mse,
) -> Pruned:
    """Keep the context points of one task that ``pruner`` scores highest at the fast weights.

    Call it before each ``diffopt.step`` and take the inner loss on the kept points. Scoring
    keeps no graph; the choice of points is not differentiated (paper Sec. 2.2).

    Args:
        model: the module given to ``higher.innerloop_ctx``.
        fmodel: the patched module it yields, at the current inner step.
        x: the task's context inputs ``(points, ...)``.
        y: the task's context targets ``(points, ...)``.
        pruner: the pruning rule (ratio and score), validated and planned at every call; or
            a :class:`ncp.Selector` prepared once for this model and context,
            ``pruner.prepare(model, x[None], y[None], loss_fn=...)``, which skips that work
            at every step of the loop (the validation costs about a forward pass).
        loss_fn: per-point loss, as in :func:`ncp.meta_step` (unused with a Selector, which
            has its own).

    Returns:
        :class:`ncp.Pruned` for this one task: ``x`` ``(k, ...)``, ``y`` ``(k, ...)`` and
        ``indices`` ``(k,)`` into the context.

    Raises:
        ValueError: on mismatched shapes or devices, a loss that is not per-point, a ratio that
            keeps no point, or fast weights that do not match ``model`` (see :func:`fast_params`).

    Example:
        >>> import torch, higher, ncp
        >>> from ncp.interop.higher import prune
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.rand(40, 2), torch.rand(40, 1)
        >>> with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        ...     kept = prune(model, fmodel, x, y, ncp.ContextPruner(ratio=0.25))
        ...     _ = diffopt.step(torch.nn.functional.mse_loss(fmodel(kept.x), kept.y))
        >>> kept.x.shape, kept.indices.shape
        (torch.Size([10, 2]), torch.Size([10]))

    References:
        Tack et al., NeurIPS 2023, Sec. 2.2 and Algorithm 1.
    """
    _check_task(model, x, y)
    params = {k: v.detach() for k, v in fast_params(model, fmodel).items()}
    return _kept(_prepared(model, params, x, y, pruner, loss_fn), params, x, y)


def bootstrap_loss(
    model: nn.Module,
    fmodel: nn.Module,
    x: Tensor,
    y: Tensor,
    bootstrap: BootstrapMetaLoss,
    *,
    loss_fn: LossFn = losses.mse,
    adapt_only: Sequence[str] | None = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The bootstrap term of the fast weights ``theta_K`` after the inner loop of one task.

    The target takes ``bootstrap.steps`` first-order SGD steps on the full context from
    ``stopgrad(theta_K)``; the term is ``bootstrap.weight * ||theta_K - target||``. Add it to
    the task's outer loss: its gradient reaches the initial weights through the fast weights
    (``copy_initial_weights=False``), as in :func:`ncp.meta_step`.

    Args:
        model: the module given to ``higher.innerloop_ctx``.
        fmodel: the patched module after the inner loop.
        x: the task's full context inputs ``(points, ...)``.
        y: the task's full context targets ``(points, ...)``.
        bootstrap: the bootstrap configuration.
        loss_fn: per-point loss, as in :func:`ncp.meta_step`.
        adapt_only: names (or module prefixes) of the parameters the inner optimizer adapts,
            as in :class:`ncp.MetaConfig`; None means every trainable parameter.

    Returns:
        ``(term, target)``: the scalar weighted term, attached to the graph, and the detached
        target ``{name: parameter.shape}`` over the adapted parameters.

    Raises:
        ValueError: on mismatched shapes or devices, a loss that is not per-point, an unused
            parameter, or fast weights that do not match ``model`` (see :func:`fast_params`).

    Example:
        >>> import torch, higher, ncp
        >>> from ncp.interop.higher import bootstrap_loss
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.rand(16, 2), torch.rand(16, 1)
        >>> with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        ...     _ = diffopt.step(torch.nn.functional.mse_loss(fmodel(x), y))
        ...     term, target = bootstrap_loss(model, fmodel, x, y, ncp.BootstrapMetaLoss(steps=2))
        ...     (torch.nn.functional.mse_loss(fmodel(x), y) + term).backward()
        >>> term.shape, target["weight"].requires_grad, model.weight.grad is not None
        (torch.Size([]), False, True)

    References:
        Tack et al., NeurIPS 2023, Sec. 2.3, Eq. (3).
    """
    _check_type(bootstrap, BootstrapMetaLoss, "bootstrap")
    if bootstrap.context != "full":
        raise ValueError(
            f"`bootstrap.context`={bootstrap.context!r} is supported by ncp.meta_step only; "
            "use BootstrapMetaLoss(context='full') here."
        )
    _check_task(model, x, y)
    names = _adapted(model, adapt_only)
    params = fast_params(model, fmodel)
    check_loss_fn(model, params, x[None], y[None], loss_fn, vmap_tasks=False)
    term, target = bootstrap(
        model, params, x[None], y[None], loss_fn=loss_fn, vmap_tasks=False, names=names
    )
    return term[0], {k: v[0] for k, v in target.items()}


def rescale_callback(
    model: nn.Module,
    fmodel: nn.Module,
    x: Tensor,
    y: Tensor,
    pruner: ContextPruner | Selector,
    *,
    rescaler: GradRescaler | None = None,
    loss_fn: LossFn = losses.mse,
    adapt_only: Sequence[str] | None = None,
) -> GradCallback:
    """A ``grad_callback`` for ``diffopt.step`` that rescales full-context gradients (Eq. 4).

    At test time take each step on the full context, ``diffopt.step(loss, grad_callback=cb)``
    with ``loss`` the mean of ``loss_fn`` over ``(x, y)``. When called, ``cb`` selects the
    points ``pruner`` keeps at the current fast weights and multiplies the task's gradient by
    ``||g_pruned|| / ||g_full||`` (``rescaler.mode="grad"``) or ``loss_pruned / loss_full``
    (``"loss"``), as :func:`ncp.adapt` with ``rescaler`` does. The factor is computed without a
    graph. Norms run over the adapted parameters that received a gradient; the gradients of
    the others (frozen, or outside ``adapt_only``) are returned as None, so that ``diffopt``
    leaves them unchanged, as :func:`ncp.adapt` does. The callback reads ``fmodel`` when
    called, so one callback serves every step of the task.

    Args:
        model: the module given to ``higher.innerloop_ctx``.
        fmodel: the patched module it yields.
        x: the task's full context inputs ``(points, ...)``.
        y: the task's full context targets ``(points, ...)``.
        pruner: the pruning rule used in meta-training, or a :class:`ncp.Selector` prepared
            for this model and context (see :func:`prune`).
        rescaler: the rescaling rule; None means ``ncp.GradRescaler()`` (Eq. 4).
        loss_fn: per-point loss, as in :func:`ncp.adapt`.
        adapt_only: names (or module prefixes) of the parameters the inner optimizer adapts;
            None means every trainable parameter.

    Returns:
        A function from the gradients in ``model.parameters()`` order to the rescaled ones.

    Raises:
        ValueError: in the cases :func:`prune` refuses (the callback scores and prunes the
            same way).

    Example:
        >>> import torch, higher, ncp
        >>> from ncp.interop.higher import rescale_callback
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        >>> x, y = torch.rand(64, 2), torch.rand(64, 1)
        >>> with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        ...     cb = rescale_callback(model, fmodel, x, y, ncp.ContextPruner(ratio=0.25))
        ...     for _ in range(3):
        ...         _ = diffopt.step(torch.nn.functional.mse_loss(fmodel(x), y), grad_callback=cb)
        ...     pred = fmodel(x)
        >>> pred.shape
        torch.Size([64, 1])

    References:
        Tack et al., NeurIPS 2023, Sec. 2.4 (Eq. 4), Sec. 3.4 and Algorithm 2.
    """
    rescaler = GradRescaler() if rescaler is None else rescaler
    _check_type(rescaler, GradRescaler, "rescaler")
    _check_task(model, x, y)
    adapted = set(_adapted(model, adapt_only))
    names = [name for name, _ in model.named_parameters()]
    start = {k: v.detach() for k, v in fast_params(model, fmodel).items()}
    selector = _prepared(model, start, x, y, pruner, loss_fn)

    def callback(grads: Sequence[Tensor | None]) -> List[Tensor | None]:
        out = list(grads)
        if len(out) != len(names):
            raise ValueError(
                f"the grad_callback got {len(out)} gradients but `model` has {len(names)} "
                "parameters; pass it to the diffopt of the innerloop_ctx that yielded `fmodel`."
            )
        # Parameters that are not adapted get None, so that diffopt leaves them unchanged as
        # ncp.adapt does (higher would otherwise step frozen ones after its first step).
        used = [i for i, n in enumerate(names) if n in adapted and out[i] is not None]
        out = [g if i in used else None for i, g in enumerate(out)]
        if not used:
            return out
        full = {names[i]: out[i].unsqueeze(0) for i in used}  # type: ignore[union-attr]
        current = {k: v.detach() for k, v in fast_params(model, fmodel).items()}
        kept = selector(current, x[None], y[None])
        scaled = rescaler.rescale(
            model,
            current,
            full,
            kept.x,
            kept.y,
            loss_fn=selector.loss_fn,
            x=x[None],
            y=y[None],
            vmap_tasks=False,
        )
        for i in used:
            out[i] = scaled[names[i]][0]
        return out

    return callback
