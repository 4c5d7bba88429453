"""The closed-form GradNCP score against exact per-point autograd, and the other scores."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

import ncp
from ncp.functional import find_head, init_params, score_points
from tests import _models, _reference


def exact(model, x, y, loss_fn, head_names):
    params = dict(model.named_parameters())
    return torch.stack(
        [
            _reference.exact_scores(model, params, x[t], y[t], loss_fn, head_names)
            for t in range(x.shape[0])
        ]
    )


def closed(model, x, y, loss_fn, **kw):
    params = init_params(model, x.shape[0], detach=True)
    return score_points(model, params, x, y, loss_fn=loss_fn, **kw)


shapes = st.tuples(
    st.integers(1, 3),  # tasks
    st.integers(1, 12),  # points
    st.integers(1, 4),  # inputs
    st.integers(1, 4),  # outputs
    st.integers(1, 9),  # hidden
    st.integers(0, 2**31 - 1),  # seed
)


def make(shape, bias=True, head="linear"):
    tasks, points, d_in, d_out, hidden, seed = shape
    torch.manual_seed(seed)
    if head == "sigmoid":
        model = _models.SigmoidHead(d_in, d_out, hidden)
        names = ["head.weight", "head.bias"]
    else:
        model = _models.mlp(d_in, d_out, hidden, bias=bias)
        names = ["4.weight", "4.bias"] if bias else ["4.weight"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, points, d_in, generator=g, dtype=torch.float64)
    y = torch.rand(tasks, points, d_out, generator=g, dtype=torch.float64)
    return model.double(), x, y, names


@given(shapes)
def test_closed_form_equals_exact_for_mse_linear_head(shape):
    model, x, y, names = make(shape)
    assert_close(closed(model, x, y, ncp.losses.mse), exact(model, x, y, ncp.losses.mse, names))


@given(shapes)
def test_closed_form_equals_exact_without_bias(shape):
    model, x, y, names = make(shape, bias=False)
    assert_close(closed(model, x, y, ncp.losses.mse), exact(model, x, y, ncp.losses.mse, names))


@given(shapes)
def test_closed_form_equals_exact_with_sigmoid_after_head(shape):
    model, x, y, names = make(shape, head="sigmoid")
    assert_close(closed(model, x, y, ncp.losses.mse), exact(model, x, y, ncp.losses.mse, names))


@given(shapes)
def test_closed_form_equals_exact_for_cross_entropy(shape):
    tasks, points, d_in, d_out, hidden, seed = shape
    model, x, _, names = make((tasks, points, d_in, d_out + 1, hidden, seed))
    labels = torch.randint(
        0, d_out + 1, (tasks, points), generator=torch.Generator().manual_seed(seed)
    )
    ce = ncp.losses.cross_entropy
    assert_close(closed(model, x, labels, ce), exact(model, x, labels, ce, names))


@given(shapes)
def test_exact_path_equals_closed_form(shape):
    model, x, y, _ = make(shape)
    mse = ncp.losses.mse
    assert_close(closed(model, x, y, mse, strategy="exact"), closed(model, x, y, mse))


@given(shapes, st.integers(1, 5))
def test_chunked_scoring_equals_unchunked(shape, chunk):
    model, x, y, _ = make(shape)
    for score in ("gradncp", "loss"):
        a = closed(model, x, y, ncp.losses.mse, score=score, chunk_size=chunk)
        b = closed(model, x, y, ncp.losses.mse, score=score)
        assert_close(a, b)


def test_conv_head_uses_exact_per_point_gradient():
    torch.manual_seed(0)
    model = _models.ConvHead().double()
    x, y = torch.randn(2, 7, 2, dtype=torch.float64), torch.rand(2, 7, 3, dtype=torch.float64)
    got = closed(model, x, y, ncp.losses.mse)
    assert_close(got, exact(model, x, y, ncp.losses.mse, ["head.weight", "head.bias"]))


def test_scores_use_the_given_per_task_params():
    model, x, y, names = make((2, 6, 2, 1, 5, 3))
    params = init_params(model, 2, detach=True)
    params = {
        k: v + 0.1 * torch.arange(2, dtype=v.dtype).view(-1, *[1] * (v.dim() - 1))
        for k, v in params.items()
    }
    got = ncp.ContextPruner().scores(model, x, y, params=params)
    for t in range(2):
        p_t = {k: v[t] for k, v in params.items()}
        assert_close(got[t], _reference.exact_scores(model, p_t, x[t], y[t], ncp.losses.mse, names))


def test_loss_score_is_the_per_point_loss():
    model, x, y, _ = make((2, 9, 2, 3, 5, 1))
    got = closed(model, x, y, ncp.losses.mse, score="loss")
    with torch.no_grad():
        want = ncp.losses.mse(torch.stack([model(x[t]) for t in range(2)]), y)
    assert_close(got, want)
    assert not got.requires_grad


def test_random_score_follows_generator():
    model, x, y, _ = make((2, 9, 2, 3, 5, 1))
    a = closed(
        model, x, y, ncp.losses.mse, score="random", generator=torch.Generator().manual_seed(5)
    )
    b = closed(
        model, x, y, ncp.losses.mse, score="random", generator=torch.Generator().manual_seed(5)
    )
    c = closed(
        model, x, y, ncp.losses.mse, score="random", generator=torch.Generator().manual_seed(6)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_scores_carry_no_graph():
    model, x, y, _ = make((2, 9, 2, 3, 5, 1))
    s = ncp.ContextPruner().scores(model, x, y)
    assert not s.requires_grad and s.grad_fn is None


def test_find_head_is_last_parametrised_layer_called():
    model = _models.SigmoidHead()
    assert find_head(model, dict(model.named_parameters()), torch.randn(3, 2)) == "head"
    seq = _models.mlp()
    assert find_head(seq, dict(seq.named_parameters()), torch.randn(3, 2)) == "4"


def test_head_by_name_and_unknown_head():
    model, x, y, _names = make((1, 5, 2, 1, 4, 0))
    by_name = ncp.ContextPruner(head="2").scores(model, x, y)
    assert_close(by_name, exact(model, x, y, ncp.losses.mse, ["2.weight", "2.bias"]))
    with pytest.raises(
        ValueError, match=r"`ContextPruner.head`='nope' is not a submodule.*\['0', '2', '4'\]"
    ):
        ncp.ContextPruner(head="nope").scores(model, x, y)
    with pytest.raises(ValueError, match="owns no trainable parameters"):
        ncp.ContextPruner(head="1").scores(model, x, y)


def test_no_head_found():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 1))
            self.inner = nn.Identity()

        def forward(self, x):
            return self.inner(x) @ self.w

    model = Functional()
    x, y = torch.randn(1, 4, 2), torch.randn(1, 4, 1)
    with pytest.raises(ValueError, match="no linear/conv head found"):
        ncp.ContextPruner().scores(model, x, y)
    assert ncp.ContextPruner(score="loss").scores(model, x, y).shape == (1, 4)


def test_head_called_twice_is_refused():
    with pytest.raises(ValueError, match="called more than once"):
        ncp.ContextPruner().scores(
            _models.HeadCalledTwice(), torch.randn(1, 4, 2), torch.randn(1, 4, 2)
        )


def test_linear_head_score_formula():
    phi = torch.tensor([[3.0, 4.0]])
    g = torch.tensor([[1.0, 2.0]])
    s = ncp.functional.linear_head_score(phi, g)
    assert_close(s, torch.tensor([5.0**0.5 * 26.0**0.5]))
    assert_close(
        ncp.functional.linear_head_score(phi, g, bias=False), torch.tensor([5.0**0.5 * 5.0])
    )


def test_scoring_under_a_callers_no_grad_equals_scoring_with_grad():
    torch.manual_seed(0)
    model = _models.mlp(2, 3)
    x, y = torch.randn(2, 10, 2), torch.rand(2, 10, 3)
    pruner = ncp.ContextPruner(ratio=0.5)
    with torch.no_grad():
        inside = pruner.scores(model, x, y)
        kept = pruner(model, x, y).indices
    assert_close(inside, pruner.scores(model, x, y))
    assert torch.equal(kept, pruner(model, x, y).indices)


def test_loss_that_ignores_the_head_is_refused():
    model = _models.mlp(2, 3)
    x, y = torch.randn(1, 4, 2), torch.rand(1, 4, 3)

    def constant(pred, target):
        return (target * 0 + 1).sum(-1)

    with pytest.raises(ValueError, match="does not depend on the output of the head"):
        ncp.ContextPruner().scores(model, x, y, loss_fn=constant)


def test_linear_head_score_allocates_nothing_the_size_of_phi():
    from torch.profiler import ProfilerActivity, profile

    phi, dz = torch.randn(8192, 512), torch.randn(8192, 3)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ncp.functional.linear_head_score(phi, dz)
    largest = max(e.cpu_memory_usage for e in prof.key_averages())
    # outputs and reductions are (points,) vectors; phi**2 would be 16 MiB
    assert 0 < largest <= 4 * phi.shape[0] * 4
