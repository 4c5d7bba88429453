"""BootstrapMetaLoss: the target carries no graph; the term matches its definition."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import ncp
from ncp.functional import init_params, parameter_distance
from tests import _models, _reference


def setup(seed=0):
    torch.manual_seed(seed)
    model = _models.mlp().double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 2, generator=g, dtype=torch.float64)
    y = torch.rand(2, 16, 1, generator=g, dtype=torch.float64)
    return model, x, y


def test_target_has_no_graph_and_no_gradient_reaches_it():
    model, x, y = setup()
    params = init_params(model, 2)
    boot = ncp.BootstrapMetaLoss(steps=3, lr=0.1, weight=2.0)
    term, target = boot(model, params, x, y)
    assert all(t.grad_fn is None and not t.requires_grad for t in target.values())
    # d term / d theta = weight * (theta - target) / ||theta - target||: target is a constant.
    grads = torch.autograd.grad(term.sum(), [params[k] for k in params])
    diff = {k: params[k].detach() - target[k] for k in params}
    norm = torch.sqrt(sum(d.flatten(1).pow(2).sum(1) for d in diff.values()))
    for g, k in zip(grads, params, strict=True):
        want = 2.0 * diff[k] / norm.view(-1, *[1] * (diff[k].dim() - 1))
        assert_close(g, want)


def test_target_matches_reference_sgd():
    model, x, y = setup(1)
    params = init_params(model, 2, detach=True)
    target = ncp.BootstrapMetaLoss(steps=4, lr=0.2).target(model, params, x, y)
    for t in range(2):
        p = {n: v.detach().clone() for n, v in model.named_parameters()}
        for _ in range(4):
            leaves = {n: v.requires_grad_(True) for n, v in p.items()}
            loss = _reference.point_losses(model, leaves, x[t], y[t], ncp.losses.mse).mean()
            p = {n: v.detach() for n, v in _reference.sgd(leaves, loss, 0.2, False).items()}
        for n in p:
            assert_close(target[n][t], p[n])


def test_term_is_weighted_unsquared_l2_and_squared_option():
    a = {"w": torch.tensor([[3.0, 0.0], [1.0, 1.0]]), "b": torch.tensor([[4.0], [0.0]])}
    b = {"w": torch.zeros(2, 2), "b": torch.zeros(2, 1)}
    assert_close(parameter_distance(a, b), torch.tensor([5.0, 2.0**0.5]))
    assert_close(parameter_distance(a, b, squared=True), torch.tensor([25.0, 2.0]))
    assert_close(
        ncp.BootstrapMetaLoss(weight=3.0).distance(a, b), torch.tensor([15.0, 3 * 2.0**0.5])
    )


def test_zero_distance_has_zero_gradient_not_nan():
    p = {"w": torch.ones(2, 3, requires_grad=True)}
    d = parameter_distance(p, {"w": torch.ones(2, 3)})
    (g,) = torch.autograd.grad(d.sum(), [p["w"]])
    assert torch.equal(g, torch.zeros(2, 3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(steps=0),
            r"`BootstrapMetaLoss.steps` must be an int >= 1, got 0; pass bootstrap=None",
        ),
        (dict(lr=0), r"`BootstrapMetaLoss.lr` must be > 0, got 0"),
        (dict(weight=-1.0), r"`BootstrapMetaLoss.weight` must be >= 0, got -1.0"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ncp.BootstrapMetaLoss(**kwargs)
