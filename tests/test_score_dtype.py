"""ContextPruner(score_dtype=...): scoring under autocast in bf16 / fp16."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import ncp
from tests import _models


def setup(seed=0, tasks=2, points=256):
    torch.manual_seed(seed)
    model = _models.mlp(2, 3, hidden=32)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, points, 2, generator=g) * 2 - 1
    y = torch.rand(tasks, points, 3, generator=g)
    return model, x, y


@pytest.mark.parametrize("score", ["gradncp", "loss"])
def test_bf16_scores_are_float32_and_close_to_full_precision(score):
    model, x, y = setup()
    full = ncp.ContextPruner(score=score).scores(model, x, y)
    low = ncp.ContextPruner(score=score, score_dtype=torch.bfloat16).scores(model, x, y)
    assert low.dtype == torch.float32
    assert not torch.equal(low, full)  # it did run in bf16
    assert_close(low, full, rtol=0.05, atol=1e-3)


def test_bf16_scoring_keeps_nearly_the_same_points_in_meta_step():
    model, x, y = setup(points=400)
    cfg = ncp.MetaConfig(inner_steps=3, bootstrap=None, pruner=ncp.ContextPruner(ratio=0.25))
    low_cfg = ncp.MetaConfig(
        inner_steps=3,
        bootstrap=None,
        pruner=ncp.ContextPruner(ratio=0.25, score_dtype=torch.bfloat16),
    )
    a = ncp.meta_step(model, (x, y), cfg)
    b = ncp.meta_step(model, (x, y), low_cfg)
    assert a.kept_indices is not None and b.kept_indices is not None
    same = sum(
        len(set(u.tolist()) & set(v.tolist()))
        for u, v in zip(a.kept_indices.flatten(0, 1), b.kept_indices.flatten(0, 1), strict=True)
    )
    assert same / a.kept_indices.numel() > 0.9
    # the inner steps themselves stay in float32: gradients reach the model in its dtype
    b.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_score_dtype_is_validated():
    with pytest.raises(ValueError, match=r"`ContextPruner.score_dtype` must be torch.bfloat16"):
        ncp.ContextPruner(score_dtype=torch.float64)
    with pytest.raises(ValueError, match="no effect with score='random'"):
        ncp.ContextPruner(score="random", score_dtype=torch.bfloat16)
