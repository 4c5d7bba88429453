"""One meta-step captured once as a CUDA graph and replayed on every batch.

A GradNCP step on a small context is launch-bound on a GPU: at 64x64 with 4 tasks its ~2,000
small kernels take longer to launch than to run, which made it slower than MAML K=16 there
(docs/benchmarks.md). The step has static shapes (``k = ratio x points`` is fixed, selection is
``topk`` and ``gather``, nothing is read back to the host once ``MetaConfig.check_finite`` is
off), so the whole of ``meta_step`` and its ``backward`` can be recorded once and replayed as
one launch.
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ._config import MetaConfig
from ._driver import MetaStepResult, _unpack, meta_step
from ._lr import LearnedLR
from ._validation import check_finite
from .losses import LossFn

__all__ = ["GraphedMetaStep"]


class GraphedMetaStep:
    """``meta_step(model, batch, cfg)`` followed by ``loss.backward()``, recorded once as a
    CUDA graph and replayed for every batch of the same shapes.

    Calling it copies ``batch`` into the step's own input buffers, replays the recorded step and
    leaves the meta-gradient in each parameter's ``.grad``, where the optimizer reads it as after
    an eager ``backward``. The gradient is *written*, not accumulated: each call's ``.grad`` is
    that batch's meta-gradient, whatever ``.grad`` held before (``optimizer.zero_grad()`` is then
    unnecessary; with ``set_to_none=True`` the tensors are put back after the next call).

    Everything the recorded step reads must stay where it was at recording: update parameters
    in place (every ``torch.optim`` optimizer does; ``load_state_dict`` copies in place too),
    do not replace them. The recorded step keeps its working memory (about the eager step's
    peak) for as long as this object lives.

    On a CPU (or with ``capture=False``) the same object runs ``meta_step`` and ``backward``
    eagerly on the same buffers, with the same gradient semantics, so that a training loop
    written for it runs anywhere.

    Args:
        model: the meta-learned module (not DDP-wrapped: the gradient all-reduce is not
            recorded).
        batch: an example batch, ``(x, y)`` or ``(context_x, context_y, query_x, query_y)``;
            every later batch must have its shapes, dtypes and device.
        cfg: the configuration; ``check_finite`` is turned off inside the recorded step and,
            when ``cfg.check_finite`` is set, the inner losses are checked after each call
            instead (one value read back per call).
        loss_fn: per-point loss; default ``cfg.loss_fn``.
        learned_lr: meta-learned inner rates (their gradients are recorded too).
        capture: record a CUDA graph; default: when the model is on a CUDA device.
        warmup: eager steps on a side stream before recording (CUDA's requirement; 3).

    Raises:
        ValueError: ``capture=True`` off CUDA, a DDP-wrapped model, ``recompute_steps=True`` or a
            pruner with its own ``generator`` when capturing, or a batch of other shapes.

    Example:
        >>> import torch, ncp
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        >>> cfg = ncp.MetaConfig(inner_steps=2, pruner=ncp.ContextPruner(ratio=0.5))
        >>> step = ncp.GraphedMetaStep(model, (torch.rand(4, 64, 2), torch.rand(4, 64, 1)), cfg)
        >>> out = step((torch.rand(4, 64, 2), torch.rand(4, 64, 1)))  # .grad holds its gradient
        >>> out.loss.shape, model[0].weight.grad.shape
        (torch.Size([]), torch.Size([64, 2]))
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Sequence[Tensor],
        cfg: MetaConfig,
        *,
        loss_fn: LossFn | None = None,
        learned_lr: LearnedLR | None = None,
        capture: bool | None = None,
        warmup: int = 3,
    ) -> None:
        if not isinstance(cfg, MetaConfig):
            raise TypeError(f"`cfg` must be an ncp.MetaConfig, got {type(cfg).__name__}.")
        if isinstance(model, DistributedDataParallel):
            raise ValueError(
                "ncp.GraphedMetaStep does not record DistributedDataParallel's gradient "
                "all-reduce; pass the unwrapped module and average the gradients yourself, or "
                "use ncp.meta_step with the DDP-wrapped model."
            )
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise ValueError(f"`warmup` must be an int >= 1, got {warmup!r}.")
        _unpack(batch)  # validates: (x, y) or (context_x, context_y, query_x, query_y)
        device = batch[0].device
        capture = device.type == "cuda" if capture is None else capture
        if capture:
            _check_capturable(device, cfg)
        self.model = model
        self.cfg = cfg
        self.capture = bool(capture)
        self._check = cfg.check_finite
        self._run_cfg = dataclasses.replace(cfg, check_finite=False)
        self._loss_fn = loss_fn
        self._learned_lr = learned_lr
        self._inputs = tuple(t.detach().clone() for t in batch)
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        if learned_lr is not None:
            self._trainable += [p for p in learned_lr.parameters() if p.requires_grad]
        self._graph: torch.cuda.CUDAGraph | None = None
        self._out: MetaStepResult | None = None
        self._grads: List[Tuple[Tensor, Tensor]] = []
        if self.capture:
            self._record(warmup)

    def _step(self) -> MetaStepResult:
        out = meta_step(
            self.model,
            self._inputs,
            self._run_cfg,
            loss_fn=self._loss_fn,
            learned_lr=self._learned_lr,
        )
        out.loss.backward()
        return out

    def _record(self, warmup: int) -> None:
        side = torch.cuda.Stream(self._inputs[0].device)
        side.wait_stream(torch.cuda.current_stream(self._inputs[0].device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._zero()
                self._step()
        torch.cuda.current_stream(self._inputs[0].device).wait_stream(side)
        self._zero()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._step()
        self._graph, self._out = graph, out
        self._grads = [(p, p.grad) for p in self._trainable if p.grad is not None]

    def _zero(self) -> None:
        for p in self._trainable:
            p.grad = None

    def _copy_in(self, batch: Sequence[Tensor]) -> None:
        given = tuple(batch) if isinstance(batch, (tuple, list)) else ()
        if len(given) != len(self._inputs):
            raise ValueError(
                f"`batch` must have {len(self._inputs)} tensors like the example batch this "
                f"step was recorded with, got {type(batch).__name__} of length {len(given)}."
            )
        for i, (src, dst) in enumerate(zip(given, self._inputs, strict=True)):
            if not isinstance(src, Tensor) or (src.shape, src.dtype, src.device) != (
                dst.shape,
                dst.dtype,
                dst.device,
            ):
                got = (
                    f"{tuple(src.shape)} {src.dtype} on {src.device}"
                    if isinstance(src, Tensor)
                    else type(src).__name__
                )
                raise ValueError(
                    f"`batch[{i}]` must be {tuple(dst.shape)} {dst.dtype} on {dst.device}, as in "
                    f"the example batch, got {got}. A recorded step has fixed shapes: build "
                    "another ncp.GraphedMetaStep for this shape (or pad the batch)."
                )
            dst.copy_(src)

    def __call__(self, batch: Sequence[Tensor]) -> MetaStepResult:
        """Run the step on ``batch``; returns its :class:`ncp.MetaStepResult`. After a replay
        its tensors are the recorded step's outputs, overwritten by the next call."""
        self._copy_in(batch)
        if self._graph is None:
            self._zero()
            out = self._step()
        else:
            self._graph.replay()
            for p, g in self._grads:
                if p.grad is not g:
                    p.grad = g
            assert self._out is not None
            out = self._out
        if self._check:
            check_finite(out.inner_losses, "inner")
        return out


def _check_capturable(device: torch.device, cfg: MetaConfig) -> None:
    if device.type != "cuda":
        raise ValueError(
            f"`capture`=True records a CUDA graph, but the batch is on {device}; move the model "
            "and batch to a CUDA device, or pass capture=False to run the same step eagerly."
        )
    if cfg.recompute_steps:
        raise ValueError(
            "`MetaConfig.recompute_steps`=True is not recorded as a CUDA graph (its "
            "checkpointing reads the RNG state during backward); turn it off, or pass "
            "capture=False."
        )
    if cfg.pruner is not None and cfg.pruner.generator is not None:
        raise ValueError(
            "a ContextPruner with its own `generator` is not recorded as a CUDA graph (only "
            "the default CUDA generator is); drop the generator (score='random' then draws from "
            "the default one), or pass capture=False."
        )
