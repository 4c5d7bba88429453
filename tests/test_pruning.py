"""Top-k selection, gather, and ContextPruner."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ncp
from ncp.functional import gather_points, keep_count, top_k_indices
from tests import _models


@given(
    st.integers(1, 4),
    st.integers(1, 60),
    st.floats(0.01, 1.0),
    st.integers(0, 2**31 - 1),
)
def test_top_k_keeps_unique_highest(tasks, points, ratio, seed):
    k = keep_count(ratio, points)
    if k == 0:
        return
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(tasks, points, generator=g)
    idx = top_k_indices(scores, k)
    assert idx.shape == (tasks, k)
    for t in range(tasks):
        kept = set(idx[t].tolist())
        assert len(kept) == k
        dropped = [j for j in range(points) if j not in kept]
        if dropped:
            assert scores[t, idx[t]].min() >= scores[t, dropped].max()


@given(st.floats(0.001, 1.0), st.integers(1, 10_000))
def test_keep_count_is_floor(ratio, points):
    k = keep_count(ratio, points)
    assert k == math.floor(ratio * points) or abs(ratio * points - round(ratio * points)) < 1e-6
    assert 0 <= k <= points


def test_keep_count_is_robust_to_float_error():
    assert 0.29 * 100 < 29  # the float product falls just short
    assert keep_count(0.29, 100) == 29
    assert keep_count(0.25, 4096) == 1024


def test_gather_points_with_trailing_dims():
    x = torch.arange(2 * 5 * 3).view(2, 5, 3)
    idx = torch.tensor([[4, 0], [1, 3]])
    out = gather_points(x, idx)
    assert torch.equal(out[0, 0], x[0, 4]) and torch.equal(out[1, 1], x[1, 3])
    assert out.shape == (2, 2, 3)


def test_pruner_call_returns_consistent_points():
    torch.manual_seed(0)
    model = _models.mlp()
    x, y = torch.randn(3, 40, 2), torch.rand(3, 40, 1)
    pruner = ncp.ContextPruner(ratio=0.25)
    kept = pruner(model, x, y)
    assert kept.x.shape == (3, 10, 2) and kept.y.shape == (3, 10, 1)
    for t in range(3):
        assert torch.equal(kept.x[t], x[t, kept.indices[t]])
        assert torch.equal(kept.y[t], y[t, kept.indices[t]])
    scores = pruner.scores(model, x, y)
    for t in range(3):
        assert scores[t, kept.indices[t]].min() >= scores[t].topk(10).values.min()


def test_gradncp_keeps_the_worst_fitted_points():
    """With a constant-feature model, the score ranks points by their residual."""
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    x = torch.zeros(1, 6, 1)
    y = torch.tensor([0.1, -3.0, 0.2, 2.0, 0.0, -0.5]).view(1, 6, 1)
    kept = ncp.ContextPruner(ratio=0.34)(model, x, y)
    assert set(kept.indices[0].tolist()) == {1, 3}


def test_pruner_keep_zero_raises():
    with pytest.raises(
        ValueError,
        match=r"`ContextPruner.ratio`=0.01 keeps 0 of 64 context points; use ratio >= 0.01562",
    ):
        ncp.ContextPruner(ratio=0.01).keep(64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ratio=1.5), r"`ContextPruner.ratio` must be in \(0, 1\], got 1.5"),
        (dict(ratio=0.0), r"`ContextPruner.ratio` must be in \(0, 1\], got 0.0"),
        (dict(ratio="a"), r"`ContextPruner.ratio` must be a float"),
        (
            dict(score="grad"),
            r"`ContextPruner.score` must be one of \['gradncp', 'loss', 'random', 'spg', 'tpg'\], "
            r"got 'grad'",
        ),
        (dict(chunk_size=0), r"`ContextPruner.chunk_size` must be a positive int or None, got 0"),
        (dict(generator=torch.Generator()), r"only used by score='random'"),
    ],
)
def test_pruner_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ncp.ContextPruner(**kwargs)


def test_pruner_is_frozen_and_keyword_only():
    p = ncp.ContextPruner(ratio=0.5)
    with pytest.raises(AttributeError):
        p.ratio = 0.2  # type: ignore[misc]
    with pytest.raises(TypeError):
        ncp.ContextPruner(0.5)  # type: ignore[misc]
