"""BootstrapMetaLoss: the target carries no graph; the term matches its definition."""

from __future__ import annotations

import dataclasses

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


def test_pruned_target_context_steps_on_the_points_the_pruner_keeps():
    """Table 9's 'pruned' target: every target step re-scores and keeps the top points."""
    torch.manual_seed(0)
    model = _models.mlp().double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 20, 2, generator=g, dtype=torch.float64)
    y = torch.rand(2, 20, 1, generator=g, dtype=torch.float64)
    pruner = ncp.ContextPruner(ratio=0.25)
    boot = ncp.BootstrapMetaLoss(steps=3, lr=0.1, context="pruned")
    cfg = ncp.MetaConfig(inner_steps=2, inner_lr=0.1, pruner=pruner, bootstrap=boot)
    out = ncp.meta_step(model, (x, y), cfg)
    # by hand: three first-order steps, each on the points the pruner keeps then
    current = {k: v.detach() for k, v in out.params.items()}
    for _ in range(3):
        kept = pruner(model, x, y, params=current)
        leaves = {k: v.clone().requires_grad_(True) for k, v in current.items()}
        grads, _ = ncp.functional.task_gradients(
            model, leaves, kept.x, kept.y, ncp.losses.mse, create_graph=False
        )
        current = {k: current[k] - 0.1 * grads[k] for k in current}
    for name in current:
        assert_close(out.bootstrap_target[name], current[name], rtol=1e-6, atol=1e-9)
    full = ncp.meta_step(
        model, (x, y), dataclasses.replace(cfg, bootstrap=dataclasses.replace(boot, context="full"))
    )
    assert not torch.allclose(full.bootstrap_target["0.weight"], current["0.weight"])


def test_random_target_context_uses_the_pruner_size_and_needs_a_pruner():
    torch.manual_seed(0)
    model = _models.mlp()
    x, y = torch.rand(2, 40, 2), torch.rand(2, 40, 1)
    boot = ncp.BootstrapMetaLoss(steps=2, context="random")
    cfg = ncp.MetaConfig(inner_steps=1, pruner=ncp.ContextPruner(ratio=0.25), bootstrap=boot)
    out = ncp.meta_step(model, (x, y), cfg)
    out.loss.backward()
    assert out.bootstrap_loss.shape == (2,) and torch.isfinite(out.bootstrap_loss).all()
    with pytest.raises(ValueError, match=r"`BootstrapMetaLoss.context`='random' selects"):
        ncp.MetaConfig(pruner=None, bootstrap=boot)
    with pytest.raises(ValueError, match=r"`BootstrapMetaLoss.context` must be one of"):
        ncp.BootstrapMetaLoss(context="half")
    with pytest.raises(ValueError, match=r"needs `select`"):
        boot.target(model, ncp.functional.init_params(model, 2), x, y)
