"""Equal-memory comparison: measure what one outer step saves for backward, and fit GradNCP's
horizon into MAML's budget (the paper trains GradNCP ``1/ratio`` times longer at equal memory,
Appendix A.2 and Table 12).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Sequence, Tuple

from torch import Tensor, nn

import ncp


def saved_bytes(
    model: nn.Module,
    batch: Sequence[Tensor],
    cfg: ncp.MetaConfig,
    *,
    learned_lr: ncp.LearnedLR | None = None,
) -> int:
    """Peak bytes saved for backward by one outer step (``meta_step`` and its backward pass) of
    ``cfg`` on ``batch`` with cross-entropy: :func:`ncp.functional.saved_bytes`, which writes
    no gradient on the model or the rates."""
    return ncp.functional.saved_bytes(
        model, batch, cfg, loss_fn=ncp.losses.cross_entropy, learned_lr=learned_lr
    )


def match_steps(
    model: nn.Module,
    batch: Sequence[Tensor],
    maml: ncp.MetaConfig,
    gradncp: ncp.MetaConfig,
    *,
    max_steps: int = 200,
) -> Tuple[int, int, int]:
    """The longest GradNCP horizon whose measured saved bytes fit MAML's
    (:func:`ncp.plan_memory` with MAML's configuration as the budget).

    Returns:
        ``(steps, gradncp_bytes, maml_bytes)``.
    """
    plan = ncp.plan_memory(
        model, batch, gradncp, budget=maml, max_steps=max_steps, loss_fn=ncp.losses.cross_entropy
    )
    return plan.cfg.inner_steps, plan.saved_bytes, plan.budget


def fit_bootstrap_chunk(
    model: nn.Module,
    batch: Sequence[Tensor],
    maml: ncp.MetaConfig,
    gradncp: ncp.MetaConfig,
    *,
    learned_lr: Tuple[ncp.LearnedLR | None, ncp.LearnedLR | None] = (None, None),
    slack: float = 0.01,
) -> Dict[str, Any]:
    """Check the paper's equal-memory rule (GradNCP's horizon = MAML's / ratio) by measurement
    and, when GradNCP's bootstrap makes it bigger than MAML, find the largest bootstrap chunk
    that fits, keeping the horizon.

    "Fits" means at most ``(1 + slack)`` times MAML's saved bytes: the rule itself is not exact
    (pruning adds the scoring pass and the gathered copies, under 1 % on Conv4), so the target
    is that the bootstrap adds nothing to the peak. The candidates are the number of kept points
    ``k`` (one pruned step's worth) halved until 1.

    Args:
        model: the model both methods train.
        batch: one batch ``(context_x, context_y, query_x, query_y)``.
        maml: MAML's configuration (its saved bytes are the budget).
        gradncp: GradNCP's configuration with its horizon and bootstrap; an existing
            bootstrap ``chunk_size`` is ignored.
        learned_lr: the learned rates of MAML and of GradNCP, or None each.
        slack: tolerated excess over MAML's bytes, as a fraction.

    Returns:
        ``maml_bytes``; ``gradncp_bytes`` (unchunked bootstrap); ``gradncp_no_bootstrap_bytes``
        (no bootstrap: the rule alone); ``bootstrap_chunk`` (None when the unchunked bootstrap
        fits) and ``gradncp_chunked_bytes`` (with that chunk, else None).

    Raises:
        ValueError: when GradNCP has no pruner or bootstrap, or no chunk fits.
    """
    if gradncp.pruner is None or gradncp.bootstrap is None:
        raise ValueError("`gradncp` needs a pruner and a bootstrap to fit a bootstrap chunk.")
    if not 0 <= slack < 1:
        raise ValueError(f"`slack` must be in [0, 1), got {slack!r}.")
    budget = saved_bytes(model, batch, maml, learned_lr=learned_lr[0])
    limit = budget * (1 + slack)

    def cost(chunk: int | None) -> int:
        boot = dataclasses.replace(gradncp.bootstrap, chunk_size=chunk)  # type: ignore[arg-type]
        cfg = dataclasses.replace(gradncp, bootstrap=boot)
        return saved_bytes(model, batch, cfg, learned_lr=learned_lr[1])

    used = cost(None)
    bare = saved_bytes(
        model, batch, dataclasses.replace(gradncp, bootstrap=None), learned_lr=learned_lr[1]
    )
    out: Dict[str, Any] = {
        "maml_bytes": budget,
        "gradncp_bytes": used,
        "gradncp_no_bootstrap_bytes": bare,
        "slack": slack,
        "bootstrap_chunk": None,
        "gradncp_chunked_bytes": None,
    }
    if used <= limit:
        return out
    chunk = gradncp.pruner.keep(batch[0].shape[1])
    while chunk >= 1:
        chunked = cost(chunk)
        if chunked <= limit:
            out.update(bootstrap_chunk=chunk, gradncp_chunked_bytes=chunked)
            return out
        chunk //= 2
    raise ValueError(
        f"GradNCP with {gradncp.inner_steps} steps saves {used} bytes ({bare} without its "
        f"bootstrap), more than MAML's {budget} (+{slack:.0%}) even with a bootstrap chunk of "
        "1 point: the pruned steps alone exceed the budget; lower `--ratio`, or pass a larger "
        "`slack`."
    )
