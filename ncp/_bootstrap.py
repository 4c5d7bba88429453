"""Bootstrap correction (paper Sec. 2.3): a full-context target for the adapted parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import losses
from ._checks import is_int_at_least, is_number_above
from ._inner import first_order_steps
from ._params import Params, check_chunk_size
from .losses import LossFn

CONTEXTS: Tuple[str, ...] = ("full", "pruned", "random")


def parameter_distance(
    params: Mapping[str, Tensor], target: Mapping[str, Tensor], *, squared: bool = False
) -> Tensor:
    """L2 distance between two per-task parameter sets over the entries of ``target``,
    ``(tasks,)``.

    The norm is taken in at least float32. Its gradient at zero distance is zero (not NaN).
    """
    sq = sum(
        (params[k] - target[k])
        .flatten(1)
        .to(torch.promote_types(params[k].dtype, torch.float32))
        .pow(2)
        .sum(1)
        for k in target
    )
    assert isinstance(sq, Tensor)
    if squared:
        return sq
    # sqrt has an infinite derivative at 0; mask it so theta_K == target gives a zero gradient.
    safe = torch.where(sq > 0, sq, torch.ones_like(sq))
    return torch.where(sq > 0, safe.sqrt(), torch.zeros_like(sq))


@dataclass(frozen=True, kw_only=True)
class BootstrapMetaLoss:
    """Pulls the adapted parameters toward a target adapted further on the full context.

    From ``theta_K`` (detached), ``steps`` first-order SGD steps with learning rate ``lr`` on the
    full context give ``theta_boot``; the term added to each task's outer loss is
    ``weight * ||theta_K - stopgrad(theta_boot)||_2`` over all adapted parameters of the task
    (squared when ``squared=True``).

    Args:
        steps: number of target steps ``L`` (paper: 5).
        lr: learning rate of the target steps. The default 5e-2 is the value GradNCP is
            usually run with; Algorithm 1 (line 11) writes the inner rate ``alpha``, so pass
            ``lr=cfg.inner_lr`` to follow the algorithm literally.
        weight: the paper's ``lambda`` (100).
        squared: use the squared distance instead of the L2 norm.
        context: the points each target step uses: ``"full"`` (the paper's: the whole
            context, which recovers the information pruning dropped), ``"pruned"`` (the
            points ``MetaConfig.pruner`` keeps, re-scored at every target step) or
            ``"random"`` (a fresh random subset of the pruner's size at every step); the
            comparison of the paper's Table 9. The last two need ``MetaConfig.pruner``.
        chunk_size: accumulate each target step's gradient over chunks of at most this many
            context points, so the transient graph of a full-context step never holds more
            than one chunk; takes precedence over ``MetaConfig.chunk_size`` for the target
            only. Exact for models that treat points independently; with batch norm over
            points each chunk uses its own statistics (an approximation). Chunks interleave the
            points (chunk ``i`` takes every ``n``-th point from ``i``), so a support set sorted
            by label still gives each chunk every class: on Conv4 with batch norm, contiguous
            chunks of a label-sorted 5-way support gave a target update at cosine 0.31 to the
            unchunked one, chunks of the shuffled support 0.94
            (docs/reproduction/many_shot.md).

    Example:
        >>> import torch, ncp
        >>> model = torch.nn.Linear(2, 1)
        >>> params = {k: v.unsqueeze(0).expand(3, *v.shape) for k, v in model.named_parameters()}
        >>> term, target = ncp.BootstrapMetaLoss(steps=2)(model, params, torch.rand(3, 8, 2), torch.rand(3, 8, 1))
        >>> term.shape, target["weight"].requires_grad
        (torch.Size([3]), False)

    References:
        Tack et al., NeurIPS 2023, Sec. 2.3, Eq. (3); Flennerhag et al., Bootstrapped
        meta-learning, ICLR 2022.
    """

    steps: int = 5
    lr: float = 5e-2
    weight: float = 100.0
    squared: bool = False
    context: Literal["full", "pruned", "random"] = "full"
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if not is_int_at_least(self.steps, 1):
            raise ValueError(
                f"`BootstrapMetaLoss.steps` must be an int >= 1, got {self.steps!r}; "
                "pass bootstrap=None to MetaConfig for no bootstrap term."
            )
        if not is_number_above(self.lr):
            raise ValueError(f"`BootstrapMetaLoss.lr` must be > 0, got {self.lr!r}.")
        if not is_number_above(self.weight, 0.0, inclusive=True):
            raise ValueError(f"`BootstrapMetaLoss.weight` must be >= 0, got {self.weight!r}.")
        if not isinstance(self.squared, bool):
            raise TypeError(f"`BootstrapMetaLoss.squared` must be a bool, got {self.squared!r}.")
        check_chunk_size(self.chunk_size, "BootstrapMetaLoss")
        if self.context not in CONTEXTS:
            raise ValueError(
                f"`BootstrapMetaLoss.context` must be one of {list(CONTEXTS)}, got "
                f"{self.context!r}."
            )

    def target(
        self,
        model: nn.Module,
        params: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        *,
        loss_fn: LossFn = losses.mse,
        vmap_tasks: bool = True,
        names: Sequence[str] | None = None,
        chunk_size: int | None = None,
        select: Callable[[Params, Tensor, Tensor], Tuple[Tensor, ...]] | None = None,
    ) -> Params:
        """``theta_boot``: ``steps`` SGD steps from ``stopgrad(params)`` on ``(x, y)``; no graph.

        Only the parameters in ``names`` (default all) are stepped and returned; with
        ``chunk_size`` (or this loss's own ``chunk_size``, which takes precedence) each
        gradient is accumulated over chunks of at most that many points. For
        ``context="pruned"`` or ``"random"``, ``select`` chooses each step's points
        (:func:`ncp.meta_step` passes the matching :class:`ncp.Selector`).
        """
        if self.context != "full" and select is None:
            raise ValueError(
                f"`BootstrapMetaLoss.context`={self.context!r} needs `select`, the selector of "
                "each target step's points; ncp.meta_step passes it from MetaConfig.pruner."
            )
        target, _ = first_order_steps(
            model,
            params,
            x,
            y,
            loss_fn,
            steps=self.steps,
            lr=self.lr,
            vmap_tasks=vmap_tasks,
            names=names,
            chunk_size=chunk_size if self.chunk_size is None else self.chunk_size,
            select=None if self.context == "full" else select,
        )
        return target if names is None else {n: target[n] for n in names}

    def distance(self, params: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
        """The weighted term ``weight * ||params - target||``, ``(tasks,)``."""
        return self.weight * parameter_distance(params, target, squared=self.squared)

    def __call__(
        self,
        model: nn.Module,
        params: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        *,
        loss_fn: LossFn = losses.mse,
        vmap_tasks: bool = True,
        names: Sequence[str] | None = None,
        chunk_size: int | None = None,
        select: Callable[[Params, Tensor, Tensor], Tuple[Tensor, ...]] | None = None,
    ) -> Tuple[Tensor, Params]:
        """The bootstrap term ``(tasks,)`` and the detached target it was measured against
        (over the parameters in ``names``, default all)."""
        target = self.target(
            model,
            params,
            x,
            y,
            loss_fn=loss_fn,
            vmap_tasks=vmap_tasks,
            names=names,
            chunk_size=chunk_size,
            select=select,
        )
        return self.distance(params, target), target
