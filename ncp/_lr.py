"""Learned inner learning rates (Meta-SGD), used by the paper in practice (its ref. [35])."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

from ._checks import is_int_at_least, is_number_above
from ._params import trainable_names


class LearnedLR(nn.Module):
    """Inner learning rates that are meta-parameters: one per step, or one per parameter entry
    per step (Meta-SGD, Li et al. 2017).

    Pass it to :func:`ncp.meta_step` and :func:`ncp.adapt` as ``learned_lr=`` and give its
    parameters to your outer optimizer along with the model's. It replaces ``cfg.inner_lr`` in
    the inner loop (the bootstrap target keeps its own ``lr``).

    Args:
        model: the model whose trainable parameters the rates apply to.
        steps: number of inner steps with their own rates (``cfg.inner_steps``).
        init: initial value of every rate.
        per_parameter: one rate per parameter entry and step (shape ``(steps, *param.shape)``)
            instead of one scalar per step.

    Example:
        >>> import torch, ncp
        >>> model = torch.nn.Linear(2, 1)
        >>> lr = ncp.LearnedLR(model, steps=3, init=0.1, per_parameter=True)
        >>> lr.rate(0, "weight").shape, lr.rate(2, "bias").item()
        (torch.Size([1, 2]), 0.10000000149011612)
    """

    def __init__(
        self, model: nn.Module, steps: int, *, init: float = 1e-2, per_parameter: bool = False
    ) -> None:
        super().__init__()
        if not is_int_at_least(steps, 1):
            raise ValueError(f"`LearnedLR.steps` must be an int >= 1, got {steps!r}.")
        if not is_number_above(init):
            raise ValueError(f"`LearnedLR.init` must be a number > 0, got {init!r}.")
        self.steps = steps
        self.per_parameter = per_parameter
        self.names: List[str] = trainable_names(model)
        shapes = dict(model.named_parameters())
        if per_parameter:
            self.rates = nn.ParameterList(
                nn.Parameter(
                    torch.full(
                        (steps, *shapes[n].shape),
                        float(init),
                        dtype=shapes[n].dtype,
                        device=shapes[n].device,
                    )
                )
                for n in self.names
            )
        else:
            first = shapes[self.names[0]]
            self.rates = nn.ParameterList(
                [
                    nn.Parameter(
                        torch.full((steps,), float(init), dtype=first.dtype, device=first.device)
                    )
                ]
            )
        self._index: Dict[str, int] = {n: i for i, n in enumerate(self.names)}

    def rate(self, step: int, name: str) -> Tensor:
        """The rate of parameter ``name`` at inner step ``step``; steps past the learned horizon
        reuse the last learned step's rate."""
        k = min(step, self.steps - 1)
        if self.per_parameter:
            return self.rates[self._index[name]][k]
        return self.rates[0][k]

    def check(self, names: List[str]) -> None:
        """Raise when ``names`` (the adapted parameters) are not the ones the rates were built for."""
        missing = sorted(set(names) - set(self.names))
        if missing:
            raise ValueError(
                f"`learned_lr` has no rates for parameters {missing}; build it with "
                "ncp.LearnedLR(model, steps) from the same model (and the same adapt_only)."
            )

    def extra_repr(self) -> str:
        return (
            f"steps={self.steps}, per_parameter={self.per_parameter}, parameters={len(self.names)}"
        )
