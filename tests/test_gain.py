"""The paper's Fig. 3c baselines: self- and target-prediction gain of a last-layer step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

import ncp
from tests import _models

F64 = dict(rtol=1e-6, atol=1e-10)


def by_hand(model, x, y, loss_fn, lr):
    """For each point j: one SGD step of the last layer on l_j, then the loss change on j and
    the mean loss change on the other points, with a fresh copy of the model each time."""
    spg, tpg = (
        torch.zeros(x.shape[:2], dtype=torch.float64),
        torch.zeros(x.shape[:2], dtype=torch.float64),
    )
    for t in range(x.shape[0]):
        with torch.no_grad():
            before = loss_fn(model(x[t]).unsqueeze(0), y[t].unsqueeze(0))[0]
        for j in range(x.shape[1]):
            m = copy.deepcopy(model)
            head = m[-1]
            lj = loss_fn(m(x[t, j : j + 1]).unsqueeze(0), y[t, j : j + 1].unsqueeze(0)).sum()
            gw, gb = torch.autograd.grad(lj, [head.weight, head.bias])
            with torch.no_grad():
                head.weight -= lr * gw
                head.bias -= lr * gb
                after = loss_fn(m(x[t]).unsqueeze(0), y[t].unsqueeze(0))[0]
            change = before - after
            spg[t, j] = change[j]
            tpg[t, j] = (change.sum() - change[j]) / (x.shape[1] - 1)
    return spg, tpg


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_gain_scores_equal_a_last_layer_step_by_hand(loss):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 2, generator=g, dtype=torch.float64)
    if loss == "mse":
        model, y, loss_fn = (
            _models.mlp(d_out=2).double(),
            torch.randn(2, 9, 2, generator=g, dtype=torch.float64),
            ncp.losses.mse,
        )
    else:
        model, y, loss_fn = (
            _models.mlp(d_out=3).double(),
            torch.randint(0, 3, (2, 9), generator=g),
            ncp.losses.cross_entropy,
        )
    spg, tpg = by_hand(model, x, y, loss_fn, lr=0.3)
    for score, want in (("spg", spg), ("tpg", tpg)):
        for chunk in (None, 4):
            pruner = ncp.ContextPruner(score=score, gain_lr=0.3, chunk_size=chunk)
            assert_close(pruner.scores(model, x, y, loss_fn=loss_fn), want, **F64)


def test_spg_is_lr_times_the_squared_gradncp_score_to_first_order():
    torch.manual_seed(0)
    model = _models.mlp().double()
    x = torch.rand(1, 30, 2, dtype=torch.float64)
    y = torch.rand(1, 30, 1, dtype=torch.float64)
    lr = 1e-6
    spg = ncp.ContextPruner(score="spg", gain_lr=lr).scores(model, x, y)
    grad = ncp.ContextPruner().scores(model, x, y)
    assert_close(spg, lr * grad**2, rtol=1e-4, atol=0)


def test_gain_scores_need_the_head_output_to_be_the_model_output():
    model = _models.SigmoidHead()
    x, y = torch.rand(1, 10, 2), torch.rand(1, 10, 3)
    with pytest.raises(ValueError, match=r"score='tpg' approximates the gain with a last-layer"):
        ncp.ContextPruner(score="tpg")(model, x, y)
    with pytest.raises(ValueError, match=r"`ContextPruner.gain_lr` must be a number > 0"):
        ncp.ContextPruner(score="spg", gain_lr=0)
