"""Per-task parameters and functional forward passes.

This is the only module of ncp that touches ``nn.Module`` internals. Everything else sees
parameters as a ``dict[str, Tensor]`` whose tensors carry a leading task dimension:
``params[name].shape == (tasks, *model_param.shape)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ._checks import is_int_at_least

Params = Dict[str, Tensor]
"""Per-task parameters: name -> tensor of shape ``(tasks, *parameter.shape)``."""


def trainable_names(model: nn.Module) -> List[str]:
    """Names of the parameters the inner loop adapts (those with ``requires_grad=True``)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def static_tensors(model: nn.Module) -> Dict[str, Tensor]:
    """Frozen parameters and buffers: shared by every task and never adapted."""
    out: Dict[str, Tensor] = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    out.update(dict(model.named_buffers()))
    return out


def init_params(
    model: nn.Module,
    tasks: int,
    *,
    detach: bool = False,
    wrap: Callable[[Tensor], Tensor] | None = None,
) -> Params:
    """Expand the model's trainable parameters to ``tasks`` per-task copies.

    The copies are views (``expand``), so gradients reaching them flow back to, and are summed
    into, the model's own parameters: this is how the meta-gradient reaches ``theta_0``.
    With ``detach=True`` the result is cut from the model (test-time adaptation). ``wrap`` is
    applied to each parameter before expansion (distributed gradient averaging).
    """
    out: Params = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            src = p.detach() if detach else (wrap(p) if wrap is not None else p)
            out[name] = src.unsqueeze(0).expand(tasks, *p.shape)
    return out


def as_adapt_only(value: object, arg: str = "MetaConfig.adapt_only") -> Tuple[str, ...] | None:
    """``value`` as a tuple of parameter or module names (None stays None)."""
    if value is None:
        return None
    if (
        isinstance(value, str)
        or not isinstance(value, (tuple, list))
        or not value
        or not all(isinstance(a, str) for a in value)
    ):
        raise TypeError(
            f"`{arg}` must be a non-empty tuple of parameter or module names, e.g. "
            f"('modulations',), got {value!r}."
        )
    return tuple(value)


def adapted_names(
    model: nn.Module, adapt_only: Sequence[str] | None, arg: str = "MetaConfig.adapt_only"
) -> List[str]:
    """Trainable parameters the inner loop adapts: all, or those named (or prefixed) by
    ``adapt_only``; the others are meta-learned only."""
    names = trainable_names(model)
    if adapt_only is None:
        return names
    chosen = []
    for name in names:
        if any(name == a or name.startswith(a + ".") for a in adapt_only):
            chosen.append(name)
    unmatched = [a for a in adapt_only if not any(n == a or n.startswith(a + ".") for n in names)]
    if unmatched:
        raise ValueError(
            f"`{arg}` entries {unmatched} match no trainable parameter or module; "
            f"trainable parameters are {names}."
        )
    return chosen


def check_params(model: nn.Module, params: Mapping[str, Tensor], tasks: int) -> None:
    """Raise a clear error when ``params`` does not match ``model`` and ``tasks``."""
    if not isinstance(params, Mapping):
        fix = (
            f" Pass its `.params` ({type(params).__name__}.params)."
            if hasattr(params, "params")
            else ""
        )
        raise TypeError(
            "`params` must be a dict of per-task parameters {name: (tasks, *shape)}, got "
            f"{type(params).__name__}.{fix}"
        )
    expected = dict((name, p) for name, p in model.named_parameters() if p.requires_grad)
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(
            "`params` does not match the model's trainable parameters: "
            f"missing {missing}, unexpected {extra}. Build it with ncp.adapt(...) or from "
            "MetaStepResult.params; frozen parameters (requires_grad=False) are not part of it."
        )
    for name, p in expected.items():
        got = tuple(params[name].shape)
        want = (tasks, *p.shape)
        if got != want:
            raise ValueError(
                f"`params['{name}']` must have shape {want} (tasks, *parameter shape), got {got}."
            )


def task_forward(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, *, vmap_tasks: bool = True
) -> Tensor:
    """Evaluate ``model`` with per-task ``params`` on ``x`` of shape ``(tasks, points, ...)``.

    Returns the outputs stacked as ``(tasks, points, ...)``. With ``vmap_tasks=False`` the tasks
    run in a Python loop: slower for many tasks, but it works for models whose forward pass
    ``torch.func.vmap`` cannot trace (data-dependent control flow, ``.item()`` calls).
    """
    static = static_tensors(model)

    def one(p: Mapping[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, {**p, **static}, (xi,))

    if vmap_tasks:
        return vmap(one, in_dims=(0, 0))(dict(params), x)
    outs = [one({k: v[i] for k, v in params.items()}, x[i]) for i in range(x.shape[0])]
    return torch.stack(outs)


def check_chunk_size(value: object, owner: str) -> None:
    """``value`` is None or a positive int (``owner`` names the field in the error)."""
    if value is not None and not is_int_at_least(value, 1):
        raise ValueError(f"`{owner}.chunk_size` must be a positive int or None, got {value!r}.")


def interleaved_slices(points: int, chunk_size: int | None) -> List[slice]:
    """Strided slices covering ``range(points)``, each of at most ``chunk_size`` points: chunk
    ``i`` takes points ``i, i + n, i + 2n, ...`` for ``n`` chunks. For sums over points
    (accumulated gradients) the result is that of contiguous chunks; a context sorted by label
    still gives every chunk a mix of classes, which matters where a model normalises over the
    points of a pass (batch norm)."""
    size = points if chunk_size is None else chunk_size
    n = -(-points // size)
    return [slice(i, None, n) for i in range(n)]


def chunk_slices(points: int, chunk_size: int | None) -> List[slice]:
    """Consecutive slices of at most ``chunk_size`` points (one slice when None)."""
    size = points if chunk_size is None else chunk_size
    return [slice(s, min(s + size, points)) for s in range(0, points, size)]


def task_slice(params: Mapping[str, Tensor], i: int) -> Dict[str, Tensor]:
    """The parameters of task ``i`` (no task dimension)."""
    return {k: v[i] for k, v in params.items()}


def single_forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Evaluate ``model`` with one task's ``params`` (no task dimension) on ``x``."""
    return functional_call(model, {**params, **static_tensors(model)}, (x,))


def check_norm_layers(model: nn.Module) -> None:
    """Refuse batch-norm layers that would update running statistics inside the inner loop."""
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.track_running_stats
            and module.training
        ):
            raise ValueError(
                f"module '{name}' ({type(module).__name__}) tracks running statistics in "
                "training mode; the inner loop would overwrite them with per-task batches. "
                f"Build it with {type(module).__name__}(..., track_running_stats=False): in "
                "training mode the forward pass is unchanged (it already normalises with the "
                "batch's statistics; transductive batch norm, as in MAML), only the running "
                "averages are no longer kept. Or use nn.GroupNorm. model.eval() would also be "
                "accepted but changes what the model computes (stored statistics instead of "
                "the batch's)."
            )


def per_task_norm(tensors: Mapping[str, Tensor]) -> Tensor:
    """L2 norm over all entries of each task: ``(tasks,)`` from a dict of ``(tasks, ...)``."""
    squares = [
        t.flatten(1).to(torch.promote_types(t.dtype, torch.float32)).pow(2).sum(1)
        for t in tensors.values()
    ]
    return torch.stack(squares).sum(0).sqrt()


def parametrised_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Modules that own trainable parameters directly (not through children)."""
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            yield name, module


@contextmanager
def forward_hooks(
    modules: Mapping[str, nn.Module], hook: Callable[[str, nn.Module, tuple, object], object]
) -> Iterator[None]:
    """Temporarily register ``hook(name, module, inputs, output)`` on ``modules``.

    The handles are always removed, so the user's model carries no hooks after the call.
    """
    handles = []
    try:
        for name, module in modules.items():
            handles.append(
                module.register_forward_hook(
                    lambda mod, inp, out, _name=name: hook(_name, mod, inp, out)
                )
            )
        yield
    finally:
        for h in handles:
            h.remove()


def head_params(params: Mapping[str, Tensor], head: str) -> Dict[str, Tensor]:
    """The entries of ``params`` that belong directly to module ``head`` (local names)."""
    prefix = f"{head}." if head else ""
    out = {}
    for name, t in params.items():
        if name.startswith(prefix) and "." not in name[len(prefix) :]:
            out[name[len(prefix) :]] = t
    return out


def model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first trainable parameter."""
    for p in model.parameters():
        if p.requires_grad:
            return p.device, p.dtype
    raise ValueError(
        "`model` has no trainable parameters (all have requires_grad=False); "
        "there is nothing for the inner loop to adapt."
    )
