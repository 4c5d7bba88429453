"""Memory planning: the longest inner horizon, or the largest ratio, that fits a byte budget."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal, Sequence, Union

import torch
from torch import Tensor, nn

from ._checks import is_int_at_least
from ._config import MetaConfig
from ._driver import meta_step
from ._lr import LearnedLR
from ._memory import MemoryMeter
from ._pruning import keep_count
from .losses import LossFn

Budget = Union[int, MetaConfig, Literal["device"]]


@dataclass(frozen=True)
class MemoryPlan:
    """What :func:`plan_memory` found.

    Attributes:
        cfg: the configuration that fits, with ``inner_steps`` (or the pruner's ``ratio``)
            set to the largest value within the budget.
        saved_bytes: its measured peak of bytes saved for backward by one outer step
            (``meta_step`` and the backward pass).
        budget: the budget in bytes.
    """

    cfg: MetaConfig
    saved_bytes: int
    budget: int


def saved_bytes(
    model: nn.Module,
    batch: Sequence[Tensor],
    cfg: MetaConfig,
    *,
    loss_fn: LossFn | None = None,
    learned_lr: LearnedLR | None = None,
) -> int:
    """Peak bytes saved for backward by one outer step of ``cfg`` on ``batch`` (``meta_step``
    with ``learned_lr`` if given, and the gradient of its loss), measured with
    :class:`ncp.MemoryMeter`. Nothing is written on the model or the rates: the meta-gradient
    is taken with ``torch.autograd.grad`` and dropped."""
    weights = [p for p in model.parameters() if p.requires_grad]
    if learned_lr is not None:
        weights += [p for p in learned_lr.parameters() if p.requires_grad]
    with MemoryMeter() as meter:
        out = meta_step(model, batch, cfg, loss_fn=loss_fn, learned_lr=learned_lr)
        torch.autograd.grad(out.loss, weights, allow_unused=True)
    return meter.peak_saved_bytes


def _budget_bytes(
    model: nn.Module, batch: Sequence[Tensor], budget: Budget, loss_fn: LossFn | None
) -> int:
    if isinstance(budget, MetaConfig):
        return saved_bytes(model, batch, budget, loss_fn=loss_fn)
    if budget == "device":
        device = batch[0].device
        if device.type != "cuda":
            raise ValueError(
                "`budget`='device' reads the free memory of the batch's CUDA device, but the "
                f"batch is on {device}; pass a number of bytes or a MetaConfig to match."
            )
        return int(torch.cuda.mem_get_info(device)[0])
    if not is_int_at_least(budget, 1):
        raise ValueError(
            "`budget` must be a number of bytes (int >= 1), a MetaConfig whose memory to match, "
            f"or 'device', got {budget!r}."
        )
    return budget


def _largest(fits: Callable[[int], int | None], low: int, high: int) -> int | None:
    """The largest ``v`` in ``[low, high]`` with ``fits(v)`` not None, for a monotone
    ``fits``; None when even ``low`` does not fit (binary search)."""
    if fits(low) is None:
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid) is None:
            high = mid - 1
        else:
            low = mid
    return low


def plan_memory(
    model: nn.Module,
    batch: Sequence[Tensor],
    cfg: MetaConfig,
    *,
    budget: Budget,
    vary: Literal["inner_steps", "ratio"] = "inner_steps",
    max_steps: int = 256,
    loss_fn: LossFn | None = None,
) -> MemoryPlan:
    """The longest inner horizon ``K`` (or the largest pruning ratio) whose outer step fits
    ``budget``, measured on ``model`` and ``batch`` with :class:`ncp.MemoryMeter`.

    The memory of a meta-step grows with ``K`` and with the kept points, so a binary search
    over measured steps finds the largest value that fits; each measurement runs one
    ``meta_step`` and its backward pass on ``batch`` (use a representative batch: the same
    tasks, points and model as in training). Saved bytes are device-independent, so a plan
    made on CPU holds on a GPU (the CUDA allocator's peak was within 1-3 % of them,
    docs/benchmarks.md).

    Args:
        model: the model to meta-train.
        batch: one batch, as for :func:`ncp.meta_step`.
        cfg: the configuration to fit; ``inner_steps`` (or ``cfg.pruner.ratio``) is replaced.
        budget: bytes; or a :class:`MetaConfig` whose measured bytes are the budget (the
            paper's equal-memory comparison: GradNCP fitted into MAML's memory); or
            ``"device"``, the free memory of the batch's CUDA device (parameters, gradients
            and optimizer state already allocated there are thereby accounted for).
        vary: ``"inner_steps"`` (the longest horizon up to ``max_steps``) or ``"ratio"`` (the
            largest ratio ``k / points`` at ``cfg.inner_steps``; needs ``cfg.pruner``).
        max_steps: the longest horizon tried.
        loss_fn: per-point loss; default ``cfg.loss_fn``.

    Returns:
        A :class:`MemoryPlan`.

    Raises:
        ValueError: when even one inner step (or one kept point) does not fit.

    Example:
        >>> import torch, ncp
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        >>> batch = (torch.rand(2, 256, 2), torch.rand(2, 256, 1))
        >>> maml = ncp.MetaConfig(inner_steps=2, pruner=None, bootstrap=None)
        >>> plan = ncp.plan_memory(model, batch, ncp.MetaConfig(bootstrap=None), budget=maml)
        >>> plan.cfg.inner_steps >= 6 and plan.saved_bytes <= plan.budget
        True

    References:
        Tack et al., NeurIPS 2023, Appendix A.2: GradNCP trains ``1 / ratio`` times longer
        than MAML at the same memory.
    """
    if not isinstance(cfg, MetaConfig):
        raise TypeError(f"`cfg` must be an ncp.MetaConfig, got {type(cfg).__name__}.")
    if vary not in ("inner_steps", "ratio"):
        raise ValueError(f"`vary` must be 'inner_steps' or 'ratio', got {vary!r}.")
    if not is_int_at_least(max_steps, 1):
        raise ValueError(f"`max_steps` must be an int >= 1, got {max_steps!r}.")
    if cfg.recompute_steps:
        raise ValueError(
            "`cfg.recompute_steps`=True rebuilds each inner step's graph during backward, "
            "where ncp.MemoryMeter cannot see it, so its measured bytes would understate the "
            "peak; plan with recompute_steps=False (an upper bound of the recomputed peak) and "
            "turn recomputation on afterwards."
        )
    limit = _budget_bytes(model, batch, budget, loss_fn)
    measured: dict[int, int] = {}

    def candidate(value: int) -> MetaConfig:
        if vary == "inner_steps":
            return dataclasses.replace(cfg, inner_steps=value)
        assert cfg.pruner is not None
        pruner = dataclasses.replace(cfg.pruner, ratio=value / points)
        return dataclasses.replace(cfg, pruner=pruner)

    def fits(value: int) -> int | None:
        if value not in measured:
            measured[value] = saved_bytes(model, batch, candidate(value), loss_fn=loss_fn)
        return measured[value] if measured[value] <= limit else None

    if vary == "inner_steps":
        best = _largest(fits, 1, max_steps)
        what = f"one inner step of this configuration saves {measured.get(1)} bytes"
    else:
        if cfg.pruner is None:
            raise ValueError("`vary`='ratio' needs `cfg.pruner`; pass a MetaConfig with one.")
        points = batch[0].shape[1]
        best = _largest(fits, 1, points)
        what = f"keeping one point per step saves {measured.get(1)} bytes"
    if best is None:
        raise ValueError(f"nothing fits the budget of {limit} bytes: {what}.")
    chosen = candidate(best)
    if vary == "ratio":
        assert chosen.pruner is not None and keep_count(chosen.pruner.ratio, points) == best
    return MemoryPlan(cfg=chosen, saved_bytes=measured[best], budget=limit)
