"""ncp.diagnostics: exact whole-network per-point gradient norms and the score correlation."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from torch.testing import assert_close

import ncp
from ncp.diagnostics import gradient_norms, pearson, score_correlation
from tests import _models

F64 = dict(rtol=1e-6, atol=1e-9)


def one_point_at_a_time(model, params, x, y, loss_fn, names):
    out = torch.zeros(x.shape[:2], dtype=torch.float64)
    for t in range(x.shape[0]):
        theta = {k: v[t].detach().clone().requires_grad_(True) for k, v in params.items()}
        for j in range(x.shape[1]):
            pred = functional_call(model, theta, (x[t, j : j + 1],))
            loss = loss_fn(pred.unsqueeze(0), y[t, j : j + 1].unsqueeze(0)).sum()
            grads = torch.autograd.grad(loss, [theta[n] for n in names])
            out[t, j] = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    return out


@pytest.mark.parametrize("chunk", [3, 256])
def test_gradient_norms_equal_one_point_at_a_time(chunk):
    torch.manual_seed(0)
    model = _models.siren(hidden=12, layers=3, out_features=2).double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 10, 2, generator=g, dtype=torch.float64)
    y = torch.rand(2, 10, 2, generator=g, dtype=torch.float64)
    params = {
        k: v + 0.01 * torch.randn_like(v) for k, v in ncp.functional.init_params(model, 2).items()
    }
    names = list(params)
    got = gradient_norms(model, params, x, y, chunk_size=chunk)
    assert_close(got, one_point_at_a_time(model, params, x, y, ncp.losses.mse, names), **F64)


def test_head_only_norms_are_the_gradncp_score_and_ce_works():
    torch.manual_seed(0)
    model = _models.mlp(d_out=4).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 9), generator=g)
    params = ncp.functional.init_params(model, 2, detach=True)
    ce = ncp.losses.cross_entropy
    head = gradient_norms(model, params, x, y, loss_fn=ce, names=["4.weight", "4.bias"])
    assert_close(head, ncp.ContextPruner().scores(model, x, y, loss_fn=ce), **F64)


def test_score_correlation_is_a_correlation_and_high_for_a_linear_model():
    torch.manual_seed(0)
    x = torch.rand(3, 50, 2, dtype=torch.float64)
    y = torch.rand(3, 50, 1, dtype=torch.float64)
    linear = torch.nn.Linear(2, 1).double()  # the head is the whole network
    r = score_correlation(linear, ncp.functional.init_params(linear, 3, detach=True), x, y)
    assert_close(r, torch.ones(3, dtype=torch.float64), **F64)
    model = _models.siren(hidden=16, layers=3, out_features=1).double()
    r = score_correlation(model, ncp.functional.init_params(model, 3, detach=True), x, y)
    assert r.shape == (3,) and bool(((r > -1) & (r <= 1)).all())


def test_pearson_matches_numpy_definition():
    a = torch.tensor([[1.0, 2.0, 3.0, 5.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 4.0, 5.0, 4.0]], dtype=torch.float64)
    am, bm = a - a.mean(), b - b.mean()
    want = (am * bm).sum() / torch.sqrt((am**2).sum() * (bm**2).sum())
    assert_close(pearson(a, b), want.view(1), **F64)
