"""Equal-memory comparison: measure what one outer step saves for backward, and fit GradNCP's
horizon into MAML's budget (the paper trains GradNCP ``1/ratio`` times longer at equal memory,
Appendix A.2 and Table 12).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

from torch import Tensor, nn

import ncp


def saved_bytes(model: nn.Module, batch: Sequence[Tensor], cfg: ncp.MetaConfig) -> int:
    """Peak bytes saved for backward by one outer step (``meta_step`` and ``backward``) of
    ``cfg`` on ``batch``, measured with :class:`ncp.MemoryMeter`; the model's gradients are
    cleared afterwards."""
    with ncp.MemoryMeter() as meter:
        out = ncp.meta_step(model, batch, cfg, loss_fn=ncp.losses.cross_entropy)
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    return meter.peak_saved_bytes


def match_steps(
    model: nn.Module,
    batch: Sequence[Tensor],
    maml: ncp.MetaConfig,
    gradncp: ncp.MetaConfig,
    *,
    max_steps: int = 200,
) -> Tuple[int, int, int]:
    """The longest GradNCP horizon whose measured saved bytes fit MAML's.

    Args:
        model: the model both methods train.
        batch: one batch ``(context_x, context_y, query_x, query_y)``.
        maml: MAML's configuration (its ``inner_steps`` sets the budget).
        gradncp: GradNCP's configuration; its ``inner_steps`` is replaced.
        max_steps: the largest horizon tried.

    Returns:
        ``(steps, gradncp_bytes, maml_bytes)``.

    Raises:
        ValueError: when even one GradNCP step needs more than MAML's budget.
    """
    budget = saved_bytes(model, batch, maml)

    def cost(k: int) -> int:
        return saved_bytes(model, batch, dataclasses.replace(gradncp, inner_steps=k))

    one, two = cost(1), cost(2)
    if one > budget:
        raise ValueError(
            f"one GradNCP step saves {one} bytes, more than MAML's {budget} with "
            f"inner_steps={maml.inner_steps}; lower `--ratio` or raise `--maml-steps`."
        )
    slope = max(two - one, 1)
    k = max(1, min(max_steps, 1 + (budget - one) // slope))
    used = cost(k)
    while used > budget and k > 1:
        k -= 1
        used = cost(k)
    while k < max_steps and (nxt := cost(k + 1)) <= budget:
        k, used = k + 1, nxt
    return k, used, budget
