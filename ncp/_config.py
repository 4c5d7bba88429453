"""The meta-learning configuration: frozen, keyword-only, validated when built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import losses
from ._bootstrap import BootstrapMetaLoss
from ._checks import is_int_at_least, is_number_above
from ._params import as_adapt_only, check_chunk_size
from ._pruning import ContextPruner
from .losses import LossFn


@dataclass(frozen=True, kw_only=True)
class MetaConfig:
    """How :func:`ncp.meta_step` adapts each task. Defaults are the paper's CelebA setup.

    Args:
        inner_steps: number of differentiable inner SGD steps ``K`` (paper: 16 for GradNCP,
            4 for MAML at equal memory).
        inner_lr: inner learning rate ``alpha`` (paper, SIREN: 1e-2).
        first_order: drop second-order terms (first-order MAML). The default keeps them.
        pruner: the context pruner used before every inner step; ``None`` adapts on the full
            context (plain MAML).
        bootstrap: the bootstrap correction added to the outer loss; ``None`` for no term.
        vmap_tasks: vectorise over tasks with ``torch.func.vmap``; ``False`` runs a loop over
            tasks, for models ``vmap`` cannot trace.
        chunk_size: evaluate full-context passes (scoring, bootstrap target, query loss, test-time
            steps) at most this many points at a time, bounding their memory on huge contexts;
            the query loss is checkpointed chunk by chunk and recomputed in ``backward``.
            Results are unchanged; only for models that treat points independently. The
            pruner's own ``chunk_size``, when set, takes precedence for scoring.
        recompute_steps: keep only each inner step's inputs (the parameters and the kept
            points) for ``backward`` and recompute the step's graph there, one step at a time
            (activation checkpointing of the inner loop). The graph held between ``meta_step``
            and ``backward`` then no longer grows with ``K``: it is one step's instead of K
            steps'. The meta-gradient is unchanged; ``backward`` redoes each step's forward
            and gradient, about a third more time for the inner steps. Second-order only
            (``first_order=True`` keeps no inner graph to recompute).
        loss_fn: per-point loss ``(pred, target) -> (tasks, points)`` used by
            :func:`ncp.meta_step` and :func:`ncp.adapt` (each may override it):
            ``ncp.losses.mse`` for fields, ``ncp.losses.cross_entropy`` for class labels.
        check_finite: check the inner losses for NaN or infinity after the inner loop (and
            the losses of :func:`ncp.adapt`), raising ``FloatingPointError`` naming the step and
            task. The check reads one value back from the device per call; ``False`` skips it,
            which a step captured as a CUDA graph needs (:class:`ncp.GraphedMetaStep` checks
            after each replay instead).
        adapt_only: names of the parameters (or modules, as prefixes) the inner loop adapts;
            the other trainable parameters are meta-learned only, e.g. ``("modulations",)`` to
            adapt latent modulations as in COIN++/functa. None adapts every trainable
            parameter.

    Example:
        >>> import ncp
        >>> maml = ncp.MetaConfig(inner_steps=4, pruner=None, bootstrap=None)
        >>> maml.pruner is None and maml.first_order is False
        True
    """

    inner_steps: int = 16
    inner_lr: float = 1e-2
    first_order: bool = False
    # Frozen (immutable) instances, so one shared default is safe; a plain default (not a
    # factory) lets the docs show the value.
    pruner: ContextPruner | None = ContextPruner()  # noqa: RUF009
    bootstrap: BootstrapMetaLoss | None = BootstrapMetaLoss()  # noqa: RUF009
    loss_fn: LossFn = losses.mse
    vmap_tasks: bool = True
    adapt_only: Sequence[str] | None = None
    chunk_size: int | None = None
    recompute_steps: bool = False
    check_finite: bool = True

    def __post_init__(self) -> None:
        if not is_int_at_least(self.inner_steps, 1):
            raise ValueError(
                f"`MetaConfig.inner_steps` must be an int >= 1, got {self.inner_steps!r}."
            )
        if not is_number_above(self.inner_lr):
            raise ValueError(f"`MetaConfig.inner_lr` must be a number > 0, got {self.inner_lr!r}.")
        for name in ("first_order", "vmap_tasks", "recompute_steps", "check_finite"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`MetaConfig.{name}` must be a bool, got {getattr(self, name)!r}.")
        if self.pruner is not None and not isinstance(self.pruner, ContextPruner):
            raise TypeError(
                f"`MetaConfig.pruner` must be an ncp.ContextPruner or None, got {type(self.pruner).__name__}."
            )
        check_chunk_size(self.chunk_size, "MetaConfig")
        if self.recompute_steps and self.first_order:
            raise ValueError(
                "`MetaConfig.recompute_steps`=True recomputes the inner steps' second-order "
                "graph in backward, but `first_order`=True keeps no such graph; drop one of "
                "the two."
            )
        object.__setattr__(self, "adapt_only", as_adapt_only(self.adapt_only))
        if not callable(self.loss_fn):
            raise TypeError(
                "`MetaConfig.loss_fn` must be a per-point loss function such as "
                f"ncp.losses.mse or ncp.losses.cross_entropy, got {self.loss_fn!r}."
            )
        if self.bootstrap is not None and not isinstance(self.bootstrap, BootstrapMetaLoss):
            raise TypeError(
                "`MetaConfig.bootstrap` must be an ncp.BootstrapMetaLoss or None, got "
                f"{type(self.bootstrap).__name__}."
            )
        if self.bootstrap is not None and self.bootstrap.context != "full" and self.pruner is None:
            raise ValueError(
                f"`BootstrapMetaLoss.context`={self.bootstrap.context!r} selects the target's "
                "points with MetaConfig.pruner, which is None; pass a pruner or use "
                "context='full'."
            )
