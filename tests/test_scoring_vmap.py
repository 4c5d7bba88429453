"""The vectorised closed-form GradNCP score (used on accelerators) against exact autograd.

On CPU ``strategy="auto"`` keeps the loop over tasks, so these tests ask for
``strategy="vmap"`` to exercise the path that a GPU takes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

import ncp
from ncp.functional import init_params, score_points
from tests import _models
from tests.test_scoring import exact, make, shapes


def vectorised(model, x, y, loss_fn, head, **kw):
    params = init_params(model, x.shape[0], detach=True)
    return score_points(model, params, x, y, loss_fn=loss_fn, head=head, strategy="vmap", **kw)


@given(shapes, st.sampled_from(["linear", "sigmoid", "nobias"]), st.none() | st.integers(1, 5))
def test_vectorised_scores_equal_exact_autograd(shape, kind, chunk):
    model, x, y, names = make(shape, bias=kind != "nobias", head=kind)
    head = names[0].rsplit(".", 1)[0]
    got = vectorised(model, x, y, ncp.losses.mse, head, chunk_size=chunk)
    assert_close(got, exact(model, x, y, ncp.losses.mse, names))


@given(shapes)
def test_vectorised_scores_equal_exact_for_cross_entropy(shape):
    tasks, points, d_in, d_out, hidden, seed = shape
    model, x, _, names = make((tasks, points, d_in, d_out + 1, hidden, seed))
    labels = torch.randint(
        0, d_out + 1, (tasks, points), generator=torch.Generator().manual_seed(seed)
    )
    ce = ncp.losses.cross_entropy
    assert_close(vectorised(model, x, labels, ce, "4"), exact(model, x, labels, ce, names))


def test_vectorised_scores_follow_per_task_params():
    torch.manual_seed(0)
    model = _models.mlp(2, 3).double()
    x, y = torch.randn(3, 9, 2, dtype=torch.float64), torch.rand(3, 9, 3, dtype=torch.float64)
    params = {k: v + 0.1 * torch.randn_like(v) for k, v in init_params(model, 3).items()}
    params = {k: v.detach() for k, v in params.items()}
    loop = score_points(model, params, x, y, loss_fn=ncp.losses.mse, head="4", strategy="loop")
    vec = score_points(model, params, x, y, loss_fn=ncp.losses.mse, head="4", strategy="vmap")
    assert_close(vec, loop)
    assert not torch.equal(vec[0], vec[1])


class PointsOfPatches(nn.Module):
    """A linear head applied to several feature vectors per point (as along a NeRF ray): the
    vectorised path hands over to the loop, which sums their outer products."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.body = nn.Linear(2, 12)
        self.head = nn.Linear(4, 3, bias=bias)

    def forward(self, x):
        z = self.head(torch.tanh(self.body(x)).view(x.shape[0], 3, 4))
        return torch.sigmoid(z).mean(1)


def test_irregular_head_input_falls_back_to_the_loop():
    torch.manual_seed(0)
    model = PointsOfPatches().double()
    x, y = torch.randn(2, 5, 2, dtype=torch.float64), torch.rand(2, 5, 3, dtype=torch.float64)
    select = ncp.ContextPruner(strategy="vmap").prepare(model, x, y)
    assert select.strategy == "loop"  # decided once, when prepared
    got = vectorised(model, x, y, ncp.losses.mse, "head")
    assert_close(got, exact(model, x, y, ncp.losses.mse, ["head.weight", "head.bias"]))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strategy", ["auto", "exact"])
def test_linear_head_over_several_vectors_per_point_equals_exact_autograd(bias, strategy):
    """The summed closed form (and the exact path) against per-point autograd: the gradient of
    one point is a sum of outer products, not rank one, so ||dl/dz|| sqrt(||phi||^2 + 1) with
    the vectors stacked would be wrong."""
    torch.manual_seed(1)
    model = PointsOfPatches(bias=bias).double()
    x, y = torch.randn(3, 9, 2, dtype=torch.float64), torch.rand(3, 9, 3, dtype=torch.float64)
    names = ["head.weight", "head.bias"] if bias else ["head.weight"]
    params = init_params(model, 3, detach=True)
    got = score_points(model, params, x, y, loss_fn=ncp.losses.mse, strategy=strategy)
    assert_close(got, exact(model, x, y, ncp.losses.mse, names))


def test_vectorised_path_keeps_the_precise_errors():
    with pytest.raises(ValueError, match="called more than once"):
        vectorised(
            _models.HeadCalledTwice(),
            torch.randn(1, 4, 2),
            torch.randn(1, 4, 2),
            ncp.losses.mse,
            "lin",
        )


def test_vectorised_scores_work_under_memory_meter_and_int_inputs():
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(10, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randint(0, 10, (2, 7))
    y = torch.rand(2, 7, 3, dtype=torch.float64)
    loop = score_points(
        emb, init_params(emb, 2, detach=True), x, y, loss_fn=ncp.losses.mse, head="2"
    )
    with ncp.MemoryMeter() as meter:  # saved-tensor hooks active
        got = vectorised(emb, x, y, ncp.losses.mse, "2")
    assert_close(got, loop)
    assert meter.peak_saved_bytes > 0


def test_exact_head_scores_work_under_memory_meter():
    torch.manual_seed(0)
    model = _models.ConvHead().double()
    x, y = torch.randn(2, 7, 2, dtype=torch.float64), torch.rand(2, 7, 3, dtype=torch.float64)
    want = ncp.ContextPruner().scores(model, x, y)
    w = torch.randn(64, 64, dtype=torch.float64, requires_grad=True)
    with ncp.MemoryMeter() as meter:
        got = ncp.ContextPruner().scores(model, x, y)
        before = meter.saved_bytes
        kept = (w * w).sum()  # saves w: the meter's hooks are back after scoring
        assert meter.saved_bytes >= before + w.numel() * 8
        del kept
    assert_close(got, want)
