"""MetaConfig(recompute_steps=True): the inner steps checkpointed and recomputed in backward."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

import ncp
from tests import _models, _reference

F64 = dict(rtol=1e-6, atol=1e-8)


def _data(tasks=3, points=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, points, 2, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.rand(tasks, points, 1, generator=g, dtype=torch.float64)
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return _models.mlp().double()


def _grads(model, loss):
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


GRADNCP = ncp.MetaConfig(
    inner_steps=3,
    inner_lr=0.5,
    pruner=ncp.ContextPruner(ratio=0.3),
    bootstrap=ncp.BootstrapMetaLoss(steps=2, lr=0.1, weight=3.0),
    recompute_steps=True,
)


def test_recomputed_meta_gradient_equals_the_reference_unroll():
    model = _model()
    x, y = _data()
    out = ncp.meta_step(model, (x, y), GRADNCP)
    ref = _reference.meta_step_of(
        model, x, y, dataclasses.replace(GRADNCP, recompute_steps=False), ["4.weight", "4.bias"]
    )
    for t in range(3):
        for k in range(3):
            assert set(out.kept_indices[k, t].tolist()) == set(ref["kept"][t][k].tolist())
    assert_close(out.loss, ref["loss"], **F64)
    for a, b in zip(_grads(model, out.loss), _grads(model, ref["loss"]), strict=True):
        assert_close(a, b, **F64)


@pytest.mark.parametrize("vmap_tasks", [True, False])
def test_recompute_changes_nothing_but_memory(vmap_tasks):
    model = _model()
    x, y = _data()
    rates = ncp.LearnedLR(model, steps=3, init=0.3)
    with torch.no_grad():
        rates.rates[0].copy_(torch.tensor([0.3, 0.2, 0.4]))
    plain_cfg = dataclasses.replace(GRADNCP, recompute_steps=False, vmap_tasks=vmap_tasks)
    cfg = dataclasses.replace(plain_cfg, recompute_steps=True)
    plain = ncp.meta_step(model, (x, y), plain_cfg, learned_lr=rates)
    again = ncp.meta_step(model, (x, y), cfg, learned_lr=rates)
    assert torch.equal(plain.kept_indices, again.kept_indices)
    assert_close(again.inner_losses, plain.inner_losses, rtol=0, atol=0)
    wrt = [*model.parameters(), *rates.parameters()]
    for a, b in zip(
        torch.autograd.grad(again.loss, wrt), torch.autograd.grad(plain.loss, wrt), strict=True
    ):
        assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_recompute_keeps_one_step_of_graph_instead_of_k():
    torch.manual_seed(0)
    model = _models.mlp(hidden=64)
    x = torch.rand(2, 512, 2)
    y = torch.rand(2, 512, 1)
    base = ncp.MetaConfig(inner_steps=8, pruner=None, bootstrap=None)
    saved = {}
    for recompute in (False, True):
        cfg = dataclasses.replace(base, recompute_steps=recompute)
        with ncp.MemoryMeter() as meter:
            out = ncp.meta_step(model, (x, y), cfg)
        saved[recompute] = meter.peak_saved_bytes
        out.loss.backward()
    # K = 8 steps of graph against one (plus the query pass and the steps' inputs)
    assert saved[True] < saved[False] / 3, saved


def test_recompute_with_first_order_is_refused():
    with pytest.raises(ValueError, match=r"recompute_steps.*first_order"):
        ncp.MetaConfig(first_order=True, recompute_steps=True)
    with pytest.raises(TypeError, match=r"recompute_steps` must be a bool"):
        ncp.MetaConfig(recompute_steps=1)


def test_plan_memory_refuses_recomputed_steps_it_cannot_measure():
    model = _model()
    x, y = _data()
    with pytest.raises(ValueError, match=r"recompute_steps.*MemoryMeter cannot see"):
        ncp.plan_memory(model, (x, y), GRADNCP, budget=10**9)
