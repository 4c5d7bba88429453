"""Top-k selection of context points (scores come from ``_scoring``)."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from dataclasses import dataclass
from types import FrameType
from typing import ContextManager, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from . import losses
from ._checks import is_int_at_least, is_number_above
from ._params import Params, check_chunk_size, check_params, init_params
from ._scoring import SCORES, STRATEGIES, Score, ScorePlan, Strategy, plan
from ._validation import check_device, check_pair
from .losses import LossFn


def keep_count(ratio: float, points: int) -> int:
    """``floor(ratio * points)``, robust to float error (``0.29 * 100`` keeps 29, not 28)."""
    return math.floor(round(ratio * points, 9))


def top_k_indices(scores: Tensor, k: int) -> Tensor:
    """Indices ``(tasks, k)`` of the ``k`` highest scores of each task."""
    return torch.topk(scores, k, dim=1, sorted=False).indices


def balanced_top_k_indices(scores: Tensor, labels: Tensor, k: int, classes: int) -> Tensor:
    """Indices ``(tasks, k)`` of ``k`` high-scoring points per task, each class keeping its share.

    A class ``c`` holding ``n_c`` of a task's ``n`` points keeps its ``floor(k * n_c / n)``
    highest-scoring points; the ``r = k - sum_c floor(k * n_c / n)`` slots left over go, one
    each, to the ``r`` classes whose best point not yet kept scores highest. Every class thus
    keeps its proportional share rounded down or up, never more points than it has, and the
    total is ``k``, the memory of :func:`top_k_indices`. Ties in score keep the lower index.

    Args:
        scores: ``(tasks, points)``.
        labels: integer classes ``(tasks, points)`` in ``[0, classes)``.
        k: points kept per task, ``1 <= k <= points``.
        classes: number of classes.

    Example:
        >>> import torch
        >>> from ncp.functional import balanced_top_k_indices
        >>> scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 1.0, 0.5, 0.2, 0.1]])
        >>> labels = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
        >>> balanced_top_k_indices(scores, labels, 4, 2).sort().values
        tensor([[0, 1, 4, 5]])
    """
    tasks, n = scores.shape
    labels = labels.long()
    counts = torch.zeros(tasks, classes, dtype=torch.long, device=scores.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    quota = counts * k // n
    # Points in descending score order, then grouped by class (stably: best first in a class).
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    ranked_labels = labels.gather(1, order)
    by_class = torch.argsort(ranked_labels, dim=1, stable=True)
    position = torch.arange(n, device=scores.device).expand(tasks, n)
    first = (counts.cumsum(1) - counts).gather(1, ranked_labels.gather(1, by_class))
    rank = torch.empty_like(position).scatter_(1, by_class, position - first)  # within class
    share = quota.gather(1, ranked_labels)
    # Priority: every point inside its class's share, then each class's best remaining point
    # (one per class), each group in score order; the top k of it is the kept set.
    priority = torch.where(
        rank < share, 2 * n - position, torch.where(rank == share, n - position, -position)
    )
    return order.gather(1, torch.topk(priority, k, dim=1).indices)


def gather_points(t: Tensor, indices: Tensor) -> Tensor:
    """Select points: ``t`` ``(tasks, points, ...)`` and ``indices`` ``(tasks, k)`` give
    ``(tasks, k, ...)``."""
    rows = torch.arange(t.shape[0], device=t.device).unsqueeze(1)
    return t[rows, indices]


class Pruned(NamedTuple):
    """The kept context: ``x`` ``(tasks, k, ...)``, ``y`` ``(tasks, k, ...)``, ``indices``
    ``(tasks, k)`` into the full context. :func:`ncp.interop.higher.prune` works on one task
    and returns them without the task dimension: ``(k, ...)`` and ``(k,)``."""

    x: Tensor
    y: Tensor
    indices: Tensor


def _autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager[object]:
    """``torch.autocast`` on ``device`` in ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether ``a`` and ``b`` name one device; a missing index (``cuda``) means the current one."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" else 0
        return (a.index if a.index is not None else current) == (
            b.index if b.index is not None else current
        )
    return a.index == b.index


SMALL_CONTEXT = 64
"""Contexts with fewer points per task than this get a :class:`SmallContextWarning`."""


def _caller_outside_ncp() -> int:
    """The ``stacklevel`` that points a warning raised in the calling ncp function at the first
    frame outside the ncp package (the user's call, however deep inside ncp it started)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


class SmallContextWarning(UserWarning):
    """Pruning a context of fewer than :data:`SMALL_CONTEXT` points per task: it saves little
    memory and each step still scores every point. Shown once per calling line and context
    size (Python's default warning filter)."""


@dataclass(frozen=True, kw_only=True)
class ContextPruner:
    """Keeps the ``ratio`` fraction of context points with the highest score (paper Sec. 2.2).

    Args:
        ratio: fraction of points kept per task and step, ``k = floor(ratio * points)``.
        score: ``"gradncp"`` (last-layer gradient norm, Eq. 2), ``"loss"`` (per-point loss),
            ``"random"``, or the paper's Fig. 3c baselines ``"spg"`` / ``"tpg"`` (self- and
            target-prediction gain of a last-layer SGD step of size ``gain_lr``; TPG costs
            ``O(points^2)``; both need a linear head whose output is the model's output).
        chunk_size: score at most this many points per forward pass, bounding scoring memory
            on huge contexts. Only for models that treat points independently (no batch norm
            over points).
        head: module name of the model's last layer for ``"gradncp"``; default, the last leaf
            module with trainable parameters that the forward pass calls.
        generator: random source for ``score="random"``; on the inputs' device.
        score_dtype: ``torch.bfloat16`` or ``torch.float16`` to run the scoring forward pass
            under :func:`torch.autocast` in that dtype (scores and norms stay float32); None
            (default) scores in the inputs' dtype. Scoring is one full-context forward pass
            per inner step, so this is where lower precision buys the most time. A score
            inherits the rounding of the forward pass: once the model fits its context well
            (residuals near bf16's resolution of the outputs, about 3 significant digits) the
            ranking turns noisy. On a meta-learned Text SIREN the bf16 kept set shared 94 % of
            its points with float32's before adaptation and 30 % after 16 steps
            (docs/reproduction/neural_fields.md, section 16). On CPUs without bf16
            instructions, and for float16 on CPU, it is slower, not faster.
        balance_classes: for classification, the number of classes ``N``: the kept set then
            holds every class's share of the context (``floor(k * n_c / n)`` top-scoring
            points of class ``c``, the leftover slots to the classes whose next point scores
            highest; :func:`ncp.functional.balanced_top_k_indices`), still ``k`` points in
            all. The targets must be integer labels ``(tasks, points)`` in ``[0, N)``. None
            (default) keeps the global top ``k``, the paper's rule, which can leave whole
            classes out of a step (docs/concepts.md, "Class-balanced pruning").
        gain_lr: the step size of the last-layer update that ``"spg"`` and ``"tpg"``
            simulate (the paper's inner learning rate).
        strategy: how the GradNCP score is computed, chosen once by :meth:`prepare`:
            ``"auto"`` vectorises the closed form over tasks on accelerators, and on CPU for
            small contexts (few points, narrow layers: where a loop's cost per task
            dominates), and loops over tasks on CPU otherwise (faster there for large
            contexts; docs/benchmarks.md); ``"vmap"`` vectorises on any device (a model the
            vectorised pass cannot handle is scored task by task); ``"loop"`` never
            vectorises; ``"exact"`` differentiates the head per point even when the closed
            form applies. The scores are the same; only speed differs.

    Example:
        >>> import torch, ncp
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> x, y = torch.rand(3, 40, 2), torch.rand(3, 40, 1)
        >>> kept = ncp.ContextPruner(ratio=0.25)(model, x, y)
        >>> kept.x.shape, kept.indices.shape
        (torch.Size([3, 10, 2]), torch.Size([3, 10]))

    References:
        Tack et al., Learning Large-scale Neural Fields via Context Pruned Meta-Learning,
        NeurIPS 2023, Sec. 2.2 and Appendix B.
    """

    ratio: float = 0.25
    score: Score = "gradncp"
    chunk_size: int | None = None
    head: str | None = None
    generator: torch.Generator | None = None
    score_dtype: torch.dtype | None = None
    balance_classes: int | None = None
    strategy: Strategy = "auto"
    gain_lr: float = 1e-2

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise TypeError(f"`ContextPruner.ratio` must be a float, got {self.ratio!r}.")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"`ContextPruner.ratio` must be in (0, 1], got {self.ratio}.")
        if self.score not in SCORES:
            raise ValueError(
                f"`ContextPruner.score` must be one of {list(SCORES)}, got {self.score!r}."
            )
        check_chunk_size(self.chunk_size, "ContextPruner")
        if self.head is not None and not isinstance(self.head, str):
            raise TypeError(
                f"`ContextPruner.head` must be a module name (str) such as 'net.4', got {self.head!r}."
            )
        if self.score_dtype is not None and self.score_dtype not in (
            torch.bfloat16,
            torch.float16,
        ):
            raise ValueError(
                "`ContextPruner.score_dtype` must be torch.bfloat16, torch.float16 or None, got "
                f"{self.score_dtype!r}."
            )
        if self.score_dtype is not None and self.score == "random":
            raise ValueError(
                "`ContextPruner.score_dtype` has no effect with score='random' (no forward "
                "pass); drop it or use score='gradncp' / 'loss'."
            )
        if self.balance_classes is not None and not is_int_at_least(self.balance_classes, 2):
            raise ValueError(
                "`ContextPruner.balance_classes` must be the number of classes (an int >= 2) "
                f"or None, got {self.balance_classes!r}."
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"`ContextPruner.strategy` must be one of {list(STRATEGIES)}, got "
                f"{self.strategy!r}."
            )
        if not is_number_above(self.gain_lr):
            raise ValueError(f"`ContextPruner.gain_lr` must be a number > 0, got {self.gain_lr!r}.")
        if self.generator is not None and self.score != "random":
            raise ValueError(
                f"`ContextPruner.generator` is only used by score='random', got score={self.score!r}; "
                "drop the generator or use score='random'."
            )

    def keep(self, points: int) -> int:
        """Number of points kept out of ``points``; raises when it would be zero."""
        k = keep_count(self.ratio, points)
        if k < 1:
            raise ValueError(
                f"`ContextPruner.ratio`={self.ratio} keeps 0 of {points} context points; use "
                f"ratio >= {1.0 / points:.4g} or more points."
            )
        return k

    def prepare(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        loss_fn: LossFn = losses.mse,
        params: Mapping[str, Tensor] | None = None,
        chunk_size: int | None = None,
        vmap_tasks: bool = True,
    ) -> Selector:
        """Validate this pruner against a model, a loss and a context once; the selector that
        the inner loop then calls at every step.

        Checks that ``k >= 1``, the generator's device, the class labels (with
        ``balance_classes``) and, for ``"gradncp"``, finds the head and runs it on a few
        points, raising the precise error for a model it cannot score; then chooses how to
        score (:attr:`strategy`). Nothing of this is repeated by the selector's calls.

        Args:
            model: the user's module.
            x: context inputs ``(tasks, points, ...)``.
            y: context targets ``(tasks, points, ...)``.
            loss_fn: per-point loss.
            params: per-task parameters to check against; default, the model's own.
            chunk_size: score at most this many points per pass when the pruner's own
                ``chunk_size`` is None (``MetaConfig.chunk_size``).
            vmap_tasks: allow vectorising over tasks (``MetaConfig.vmap_tasks``).

        Returns:
            A :class:`Selector`: ``selector(params, x, y)`` returns the :class:`Pruned`
            context at ``params``, ``selector.scores(params, x, y)`` the scores.

        Example:
            >>> import torch, ncp
            >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
            >>> x, y = torch.rand(2, 40, 2), torch.rand(2, 40, 1)
            >>> select = ncp.ContextPruner(ratio=0.25).prepare(model, x, y)
            >>> params = ncp.functional.init_params(model, 2)
            >>> select(params, x, y).indices.shape, select.head, select.strategy
            (torch.Size([2, 10]), '2', 'vmap')
        """
        check_pair(x, y)
        check_device(model, x, y)
        if params is None:
            params = init_params(model, x.shape[0], detach=True)
        else:
            check_params(model, params, x.shape[0])
        try:
            k = self.keep(x.shape[1])
        except ValueError as e:
            if x.shape[0] <= x.shape[1]:
                raise
            # More "tasks" than "points": most likely one task's points without the task dim.
            raise ValueError(
                f"{e} (`x` has shape {tuple(x.shape)}, read as (tasks, points, ...): for one "
                "task's points pass x.unsqueeze(0) and y.unsqueeze(0).)"
            ) from None
        self._check_generator(x)
        if self.balance_classes is not None:
            self._check_labels(y, k, self.balance_classes)
        if x.shape[1] < SMALL_CONTEXT:
            warnings.warn(
                f"ContextPruner keeps {k} of {x.shape[1]} context points per task. A context "
                f"this small (under {SMALL_CONTEXT} points) leaves little to prune: the memory "
                "saved is small, each inner step still scores every point, and the few kept "
                "points carry less of the task (docs/concepts.md, 'How many points are kept'). "
                "Plain MAML (MetaConfig(pruner=None)) or a larger ratio may serve better. "
                "Silence with warnings.filterwarnings('ignore', category=ncp.SmallContextWarning).",
                SmallContextWarning,
                stacklevel=_caller_outside_ncp(),
            )
        with _autocast(x.device, self.score_dtype):
            how = plan(
                model,
                params,
                x,
                y,
                score=self.score,
                loss_fn=loss_fn,
                head=self.head,
                strategy=self.strategy,
                vmap_tasks=vmap_tasks,
                gain_lr=self.gain_lr,
            )
        return Selector(
            pruner=self,
            model=model,
            loss_fn=loss_fn,
            points=x.shape[1],
            k=k,
            chunk_size=self.chunk_size if self.chunk_size is not None else chunk_size,
            plan=how,
        )

    def scores(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        params: Mapping[str, Tensor] | None = None,
        loss_fn: LossFn = losses.mse,
    ) -> Tensor:
        """Scores ``(tasks, points)`` of every context point, computed without a graph (a
        one-off :meth:`prepare` and :meth:`Selector.scores`).

        Args:
            model: the user's module.
            x: context inputs ``(tasks, points, ...)``.
            y: context targets ``(tasks, points, ...)``.
            params: per-task parameters (``MetaStepResult.params``, ``ncp.adapt``); default,
                the model's own parameters for every task.
            loss_fn: per-point loss.
        """
        selector = self.prepare(model, x, y, loss_fn=loss_fn, params=params)
        return selector.scores(_params_or_init(model, params, x), x, y)

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        params: Mapping[str, Tensor] | None = None,
        loss_fn: LossFn = losses.mse,
    ) -> Pruned:
        """Keep the top-``ratio`` points of each task (a one-off :meth:`prepare` and call).

        Returns:
            :class:`Pruned` with the kept ``x``, ``y`` and their ``indices`` ``(tasks, k)``.
        """
        selector = self.prepare(model, x, y, loss_fn=loss_fn, params=params)
        return selector(_params_or_init(model, params, x), x, y)

    def _check_labels(self, y: Tensor, k: int, n: int) -> None:
        if y.dim() != 2 or y.dtype == torch.bool or y.dtype.is_floating_point or y.is_complex():
            raise ValueError(
                f"`ContextPruner.balance_classes`={n} needs integer class labels of shape "
                f"(tasks, points) as context targets, got {y.dtype} targets of shape "
                f"{tuple(y.shape)}; use balance_classes=None for regression targets."
            )
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= n:
            raise ValueError(
                f"`ContextPruner.balance_classes`={n} needs labels in [0, {n}), got labels from "
                f"{low} to {high}; set balance_classes to the number of classes."
            )
        counts = torch.zeros(y.shape[0], n, dtype=torch.long, device=y.device)
        counts.scatter_add_(1, y.long(), torch.ones_like(y, dtype=torch.long))
        present = int((counts > 0).sum(1).max())
        if k < present:
            warnings.warn(
                f"`ContextPruner.ratio`={self.ratio} keeps {k} points per step but the context "
                f"holds {present} classes, so every step leaves {present - k} of them out; "
                "raise the ratio.",
                stacklevel=4,
            )

    def _check_generator(self, x: Tensor) -> None:
        if self.generator is not None and not _same_device(self.generator.device, x.device):
            raise ValueError(
                f"`ContextPruner.generator` is on {self.generator.device} but the context is on "
                f"{x.device}; create it with torch.Generator(device={str(x.device)!r})."
            )


def _params_or_init(model: nn.Module, params: Mapping[str, Tensor] | None, x: Tensor) -> Params:
    return init_params(model, x.shape[0], detach=True) if params is None else dict(params)


@dataclass(frozen=True)
class Selector:
    """A :class:`ContextPruner` prepared for one model, loss and context
    (:meth:`ContextPruner.prepare`): call it at every inner step.

    ``selector(params, x, y)`` scores the context ``(tasks, points, ...)`` at the per-task
    ``params`` and returns the kept :class:`Pruned` points; it runs no validation, so pass the
    context it was prepared for (or one of the same shape and kind).

    Attributes:
        pruner: the configuration.
        model: the module it scores.
        loss_fn: the per-point loss.
        points: context points per task it was prepared for.
        k: points kept per task.
        chunk_size: points per scoring pass (None: all).
        plan: how the scores are computed (see :attr:`strategy`).
    """

    pruner: ContextPruner
    model: nn.Module
    loss_fn: LossFn
    points: int
    k: int
    chunk_size: int | None
    plan: ScorePlan

    @property
    def head(self) -> str | None:
        """The module whose gradient the GradNCP score measures (None for other scores)."""
        return self.plan.head

    @property
    def strategy(self) -> str:
        """How the scores are computed: ``"loop"`` (closed form, task by task), ``"vmap"``
        (closed form, all tasks in one pass), ``"exact"`` (per-point head gradients),
        ``"loss"`` or ``"random"``."""
        return self.plan.method

    def scores(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Scores ``(tasks, points)`` at ``params``, no graph attached."""
        with _autocast(x.device, self.pruner.score_dtype):
            return self.plan(
                self.model,
                params,
                x,
                y,
                loss_fn=self.loss_fn,
                chunk_size=self.chunk_size,
                generator=self.pruner.generator,
            )

    def __call__(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Pruned:
        """The kept context at ``params``: ``x`` ``(tasks, k, ...)``, ``y``, ``indices``."""
        scores = self.scores(params, x, y)
        classes = self.pruner.balance_classes
        if classes is None:
            idx = top_k_indices(scores, self.k)
        else:
            idx = balanced_top_k_indices(scores, y, self.k, classes)
        return Pruned(gather_points(x, idx), gather_points(y, idx), idx)
