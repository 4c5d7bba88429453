"""LearnedLR (Meta-SGD): learned inner rates get meta-gradients equal to a hand-written unroll."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import ncp
from tests import _models, _reference

F64 = dict(rtol=1e-6, atol=1e-9)


def setup(seed=0):
    torch.manual_seed(seed)
    model = _models.mlp().double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 20, 2, generator=g, dtype=torch.float64)
    y = torch.rand(3, 20, 1, generator=g, dtype=torch.float64)
    return model, x, y


def randomise(lr, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in lr.rates:
            r.copy_(0.05 + 0.3 * torch.rand(r.shape, generator=g, dtype=r.dtype))


@pytest.mark.parametrize("per_parameter", [False, True])
@pytest.mark.parametrize("first_order", [False, True])
def test_learned_rates_match_hand_written_unroll(per_parameter, first_order):
    model, x, y = setup()
    lr = ncp.LearnedLR(model, steps=3, per_parameter=per_parameter).double()
    randomise(lr)
    cfg = ncp.MetaConfig(inner_steps=3, first_order=first_order, pruner=None, bootstrap=None)
    out = ncp.meta_step(model, (x, y), cfg, learned_lr=lr)
    ref = _reference.meta_step(
        model, x, y, x, y, loss_fn=ncp.losses.mse, steps=3, lr=lr.rate, first_order=first_order
    )
    assert_close(out.loss, ref["loss"], **F64)
    params = list(model.parameters()) + list(lr.parameters())
    for a, b in zip(
        torch.autograd.grad(out.loss, params), torch.autograd.grad(ref["loss"], params), strict=True
    ):
        assert_close(a, b, **F64)


def test_learned_rates_with_pruning_and_bootstrap_get_gradients():
    model, x, y = setup()
    lr = ncp.LearnedLR(model, steps=4, init=0.1, per_parameter=True).double()
    out = ncp.meta_step(model, (x, y), ncp.MetaConfig(inner_steps=4), learned_lr=lr)
    out.loss.backward()
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in lr.rates)


def test_rate_shapes_and_horizon():
    model, *_ = setup()
    scalar = ncp.LearnedLR(model, steps=2, init=0.3)
    assert scalar.rate(0, "0.weight").shape == ()
    assert scalar.rate(5, "4.bias").item() == pytest.approx(0.3)  # past the horizon: last rate
    full = ncp.LearnedLR(model, steps=2, per_parameter=True)
    assert full.rate(1, "0.weight").shape == model[0].weight.shape
    assert sum(p.numel() for p in full.parameters()) == 2 * sum(
        p.numel() for p in model.parameters()
    )


def test_adapt_uses_detached_learned_rates():
    model, x, y = setup()
    lr = ncp.LearnedLR(model, steps=2, per_parameter=True).double()
    randomise(lr)
    got = ncp.adapt(model, x, y, ncp.MetaConfig(pruner=None), steps=2, learned_lr=lr).params
    ref = _reference.meta_step(
        model, x, y, x, y, loss_fn=ncp.losses.mse, steps=2, lr=lr.rate, first_order=True
    )
    for t in range(3):
        for n, v in ref["params"][t].items():
            assert_close(got[n][t], v.detach(), **F64)
    assert all(not v.requires_grad for v in got.values())


def test_errors():
    model, x, y = setup()
    with pytest.raises(ValueError, match=r"`LearnedLR.steps` must be an int >= 1, got 0"):
        ncp.LearnedLR(model, steps=0)
    with pytest.raises(ValueError, match=r"`LearnedLR.init` must be a number > 0, got -1"):
        ncp.LearnedLR(model, steps=1, init=-1)
    short = ncp.LearnedLR(model, steps=2).double()
    with pytest.raises(ValueError, match=r"rates for 2 steps but cfg.inner_steps=3"):
        ncp.meta_step(model, (x, y), ncp.MetaConfig(inner_steps=3), learned_lr=short)
    with pytest.raises(ValueError, match=r"either `lr` or `learned_lr`"):
        ncp.adapt(model, x, y, ncp.MetaConfig(), lr=0.1, learned_lr=short)
    other = ncp.LearnedLR(torch.nn.Linear(2, 1), steps=3, per_parameter=True)
    with pytest.raises(ValueError, match=r"`learned_lr` has no rates for parameters \['0.bias'"):
        ncp.meta_step(model, (x, y), ncp.MetaConfig(inner_steps=3), learned_lr=other)
    with pytest.raises(
        TypeError, match=r"`learned_lr` must be an ncp.LearnedLR or None, got float"
    ):
        ncp.meta_step(model, (x, y), ncp.MetaConfig(), learned_lr=0.1)  # type: ignore[arg-type]
