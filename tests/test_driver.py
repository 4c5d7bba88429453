"""meta_step, adapt and forward against the hand-written reference in tests/_reference.py."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.testing import assert_close

import ncp
from tests import _models, _reference

F64 = dict(rtol=1e-6, atol=1e-8)


def data(tasks=3, points=24, d_in=2, d_out=1, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, points, d_in, generator=g, dtype=dtype) * 2 - 1
    y = torch.rand(tasks, points, d_out, generator=g, dtype=dtype)
    return x, y


def meta_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def seeded(factory, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return factory().to(dtype)


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_matches_hand_written_unroll(first_order):
    model = seeded(_models.mlp)
    x, y = data()
    cfg = ncp.MetaConfig(
        inner_steps=3, inner_lr=0.3, first_order=first_order, pruner=None, bootstrap=None
    )
    out = ncp.meta_step(model, (x, y), cfg)
    ref = _reference.meta_step(
        model, x, y, x, y, loss_fn=ncp.losses.mse, steps=3, lr=0.3, first_order=first_order
    )
    assert_close(out.loss, ref["loss"], **F64)
    assert_close(out.query_loss, ref["query_loss"], **F64)
    for g, r in zip(meta_grads(model, out.loss), meta_grads(model, ref["loss"]), strict=True):
        assert_close(g, r, **F64)


def test_first_and_second_order_meta_gradients_differ():
    model = seeded(_models.mlp)
    x, y = data()
    grads = []
    for first_order in (False, True):
        cfg = ncp.MetaConfig(
            inner_steps=3, inner_lr=0.3, first_order=first_order, pruner=None, bootstrap=None
        )
        grads.append(meta_grads(model, ncp.meta_step(model, (x, y), cfg).loss)[0])
    assert (grads[0] - grads[1]).abs().max() > 1e-6


def test_support_query_batch_matches_reference():
    model = seeded(lambda: _models.Conv4(classes=3))
    g = torch.Generator().manual_seed(1)
    cx = torch.randn(2, 6, 1, 8, 8, generator=g, dtype=torch.float64)
    qx = torch.randn(2, 9, 1, 8, 8, generator=g, dtype=torch.float64)
    cy = torch.randint(0, 3, (2, 6), generator=g)
    qy = torch.randint(0, 3, (2, 9), generator=g)
    cfg = ncp.MetaConfig(inner_steps=2, inner_lr=0.1, pruner=None, bootstrap=None)
    out = ncp.meta_step(model, (cx, cy, qx, qy), cfg, loss_fn=ncp.losses.cross_entropy)
    ref = _reference.meta_step(
        model, cx, cy, qx, qy, loss_fn=ncp.losses.cross_entropy, steps=2, lr=0.1
    )
    assert_close(out.loss, ref["loss"], **F64)
    for a, b in zip(meta_grads(model, out.loss), meta_grads(model, ref["loss"]), strict=True):
        assert_close(a, b, **F64)


def test_pruned_step_matches_reference_with_exact_scores():
    model = seeded(_models.mlp)
    x, y = data(points=20)
    cfg = ncp.MetaConfig(
        inner_steps=3,
        inner_lr=0.5,
        pruner=ncp.ContextPruner(ratio=0.3),
        bootstrap=ncp.BootstrapMetaLoss(steps=2, lr=0.1, weight=3.0),
    )
    out = ncp.meta_step(model, (x, y), cfg)
    ref = _reference.meta_step(
        model,
        x,
        y,
        x,
        y,
        loss_fn=ncp.losses.mse,
        steps=3,
        lr=0.5,
        ratio=0.3,
        head_names=["4.weight", "4.bias"],
        boot_steps=2,
        boot_lr=0.1,
        weight=3.0,
    )
    assert out.kept_indices is not None and out.kept_indices.shape == (3, 3, 6)
    for t in range(3):
        for k in range(3):
            assert set(out.kept_indices[k, t].tolist()) == set(ref["kept"][t][k].tolist())
    assert_close(out.loss, ref["loss"], **F64)
    assert_close(out.bootstrap_loss, ref["bootstrap_loss"], **F64)
    for a, b in zip(meta_grads(model, out.loss), meta_grads(model, ref["loss"]), strict=True):
        assert_close(a, b, **F64)


def test_ratio_one_equals_unpruned():
    model = seeded(_models.mlp)
    x, y = data()
    base = dict(inner_steps=3, inner_lr=0.3, bootstrap=None)
    full = ncp.meta_step(model, (x, y), ncp.MetaConfig(pruner=None, **base))
    kept = ncp.meta_step(model, (x, y), ncp.MetaConfig(pruner=ncp.ContextPruner(ratio=1.0), **base))
    assert_close(kept.loss, full.loss, rtol=1e-12, atol=1e-12)
    assert_close(kept.inner_losses, full.inner_losses, rtol=1e-12, atol=1e-12)
    for a, b in zip(meta_grads(model, kept.loss), meta_grads(model, full.loss), strict=True):
        assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_vmap_and_loop_over_tasks_agree():
    model = seeded(_models.mlp)
    x, y = data()
    outs = [
        ncp.meta_step(
            model,
            (x, y),
            ncp.MetaConfig(inner_steps=2, vmap_tasks=v, bootstrap=ncp.BootstrapMetaLoss(steps=1)),
        )
        for v in (True, False)
    ]
    assert_close(outs[0].loss, outs[1].loss, **F64)
    assert torch.equal(outs[0].kept_indices, outs[1].kept_indices)
    for a, b in zip(meta_grads(model, outs[0].loss), meta_grads(model, outs[1].loss), strict=True):
        assert_close(a, b, **F64)


def test_result_fields_and_shapes():
    model = seeded(_models.mlp)
    x, y = data(tasks=4, points=40)
    out = ncp.meta_step(model, (x, y), ncp.MetaConfig(inner_steps=5))
    assert out.loss.dim() == 0
    assert out.query_loss.shape == (4,)
    assert out.bootstrap_loss is not None and out.bootstrap_loss.shape == (4,)
    assert out.inner_losses.shape == (5, 4) and not out.inner_losses.requires_grad
    assert out.kept_indices is not None and out.kept_indices.shape == (5, 4, 10)
    assert set(out.params) == {n for n, _ in model.named_parameters()}
    assert out.params["0.weight"].shape == (4, 16, 2) and out.params["0.weight"].requires_grad
    assert out.bootstrap_target is not None
    assert all(not t.requires_grad for t in out.bootstrap_target.values())
    expected = (out.query_loss + out.bootstrap_loss).mean()
    assert_close(out.loss, expected)


def test_inner_loss_decreases_on_a_fitting_problem():
    model = seeded(_models.mlp)
    x, y = data(tasks=2, points=64)
    out = ncp.meta_step(
        model, (x, y), ncp.MetaConfig(inner_steps=10, inner_lr=0.5, pruner=None, bootstrap=None)
    )
    assert (out.inner_losses[-1] < out.inner_losses[0]).all()


MODELS = {
    "mlp": (lambda: _models.mlp(2, 3), 3, ncp.losses.mse),
    "siren": (None, 3, ncp.losses.mse),
    "frozen": (lambda: _models.Frozen(2, 3), 3, ncp.losses.mse),
    "sigmoid-head": (lambda: _models.SigmoidHead(2, 3), 3, ncp.losses.mse),
    "no-bias-head": (lambda: _models.mlp(2, 3, bias=False), 3, ncp.losses.mse),
    "conv-head": (_models.ConvHead, 3, ncp.losses.mse),
}


def _siren():
    return _models.siren(hidden=32, layers=3)


def _snapshot(model):
    return (
        copy.deepcopy(model.state_dict()),
        set(vars(model)),
        [p.grad for p in model.parameters()],
        {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
        model.training,
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_any_model_and_no_hidden_state(name):
    factory, d_out, loss_fn = MODELS[name]
    torch.manual_seed(0)
    model = (factory or _siren)()
    x, y = data(tasks=2, points=32, d_out=d_out, dtype=torch.float32)
    before = _snapshot(model)
    cfg = ncp.MetaConfig(inner_steps=3)
    out = ncp.meta_step(model, (x, y), cfg, loss_fn=loss_fn)
    params = ncp.adapt(model, x, y, cfg, steps=2, mode="rescaled").params
    after = _snapshot(model)
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), k
    assert before[1:] == after[1:]
    assert torch.isfinite(out.loss)
    grads = meta_grads(model, out.loss)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert ncp.forward(model, params, x).shape == y.shape


def test_conv4_classifier_with_pruning():
    torch.manual_seed(0)
    model = _models.Conv4(classes=3)
    g = torch.Generator().manual_seed(0)
    cx, qx = torch.randn(2, 12, 1, 8, 8, generator=g), torch.randn(2, 9, 1, 8, 8, generator=g)
    cy, qy = torch.randint(0, 3, (2, 12), generator=g), torch.randint(0, 3, (2, 9), generator=g)
    cfg = ncp.MetaConfig(inner_steps=3, inner_lr=0.1, pruner=ncp.ContextPruner(ratio=0.5))
    out = ncp.meta_step(model, (cx, cy, qx, qy), cfg, loss_fn=ncp.losses.cross_entropy)
    out.loss.backward()
    assert out.kept_indices.shape == (3, 2, 6)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_frozen_parameters_are_not_adapted_and_get_no_gradient():
    torch.manual_seed(0)
    model = _models.Frozen()
    x, y = data(dtype=torch.float32)
    out = ncp.meta_step(model, (x, y), ncp.MetaConfig(inner_steps=2))
    assert "features.weight" not in out.params
    out.loss.backward()
    assert model.features.weight.grad is None
    assert model.net[1].weight.grad is not None


def test_transductive_batch_norm_is_accepted_and_running_stats_refused():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cx, cy = torch.randn(2, 6, 1, 8, 8, generator=g), torch.randint(0, 3, (2, 6), generator=g)
    cfg = ncp.MetaConfig(inner_steps=1, pruner=None, bootstrap=None)
    ok = _models.Conv4(norm="bn")
    assert torch.isfinite(ncp.meta_step(ok, (cx, cy), cfg, loss_fn=ncp.losses.cross_entropy).loss)
    bad = _models.Conv4(norm="bn-running")
    with pytest.raises(ValueError, match=r"track_running_stats=False"):
        ncp.meta_step(bad, (cx, cy), cfg, loss_fn=ncp.losses.cross_entropy)
    bad.eval()  # running statistics are read, not written: allowed
    assert torch.isfinite(ncp.meta_step(bad, (cx, cy), cfg, loss_fn=ncp.losses.cross_entropy).loss)


def test_follows_input_dtype():
    model = seeded(_models.mlp, dtype=torch.float64)
    x, y = data()
    out = ncp.meta_step(model, (x, y), ncp.MetaConfig(inner_steps=2))
    assert out.loss.dtype == torch.float64
    assert out.params["0.weight"].dtype == torch.float64
    params = ncp.adapt(model, x, y, ncp.MetaConfig(), steps=1, mode="rescaled").params
    assert params["0.weight"].dtype == torch.float64


# --- adapt ---------------------------------------------------------------------------------


def test_adapt_without_rescaler_is_plain_full_context_sgd():
    model = seeded(_models.mlp)
    x, y = data()
    params = ncp.adapt(model, x, y, ncp.MetaConfig(pruner=None), steps=3, lr=0.2).params
    ref = _reference.meta_step(
        model, x, y, x, y, loss_fn=ncp.losses.mse, steps=3, lr=0.2, first_order=True
    )
    for t in range(x.shape[0]):
        for n, v in ref["params"][t].items():
            assert_close(params[n][t], v.detach(), **F64)
    assert all(not v.requires_grad for v in params.values())


def test_adapt_with_grad_rescaler_matches_equation_4():
    model = seeded(_models.mlp)
    x, y = data(points=20)
    cfg = ncp.MetaConfig(pruner=ncp.ContextPruner(ratio=0.25))
    params = ncp.adapt(model, x, y, cfg, steps=2, lr=0.1, mode="rescaled").params
    names = [n for n, _ in model.named_parameters()]
    for t in range(x.shape[0]):
        p = {n: v.detach().clone() for n, v in model.named_parameters()}
        for _ in range(2):
            leaves = {n: v.requires_grad_(True) for n, v in p.items()}
            s = _reference.exact_scores(
                model, leaves, x[t], y[t], ncp.losses.mse, ["4.weight", "4.bias"]
            )
            idx = torch.argsort(s, descending=True)[:5]
            full = torch.autograd.grad(
                _reference.point_losses(model, leaves, x[t], y[t], ncp.losses.mse).mean(),
                list(leaves.values()),
            )
            pruned = torch.autograd.grad(
                _reference.point_losses(model, leaves, x[t][idx], y[t][idx], ncp.losses.mse).mean(),
                list(leaves.values()),
            )
            step = _reference.rescaled_step(full, pruned)
            p = {n: (leaves[n] - 0.1 * g).detach() for n, g in zip(names, step, strict=True)}
        for n in names:
            assert_close(params[n][t], p[n], **F64)


def test_adapt_loss_mode_and_prune_mode_run_and_differ():
    model = seeded(_models.mlp)
    x, y = data()
    cfg = ncp.MetaConfig(pruner=ncp.ContextPruner(ratio=0.25))
    a = ncp.adapt(model, x, y, cfg, steps=2, mode=ncp.GradRescaler(mode="loss")).params
    b = ncp.adapt(model, x, y, cfg, steps=2, mode=ncp.GradRescaler(mode="grad")).params
    c = ncp.adapt(model, x, y, cfg, steps=2, mode="pruned").params
    assert not torch.allclose(a["0.weight"], b["0.weight"])
    assert not torch.allclose(b["0.weight"], c["0.weight"])


def test_adapt_continues_from_given_params():
    model = seeded(_models.mlp)
    x, y = data()
    cfg = ncp.MetaConfig(pruner=None)
    two = ncp.adapt(model, x, y, cfg, steps=2).params
    one = ncp.adapt(model, x, y, cfg, steps=1).params
    assert_close(
        ncp.adapt(model, x, y, cfg, steps=1, params=one).params["0.weight"], two["0.weight"]
    )


def test_meta_learned_init_beats_random_after_adaptation():
    """A few meta-training steps make test-time adaptation better on held-out tasks."""
    torch.manual_seed(0)
    model = _models.mlp(1, 1, hidden=32)

    def tasks(n, seed):
        g = torch.Generator().manual_seed(seed)
        amp = torch.rand(n, 1, 1, generator=g) + 0.5
        phase = torch.rand(n, 1, 1, generator=g) * 3
        x = torch.linspace(-1, 1, 32).view(1, -1, 1).expand(n, -1, -1)
        return x, amp * torch.sin(3 * x + phase)

    cfg = ncp.MetaConfig(
        inner_steps=4,
        inner_lr=0.1,
        pruner=ncp.ContextPruner(ratio=0.5),
        bootstrap=ncp.BootstrapMetaLoss(steps=2, weight=1.0),
    )
    xt, yt = tasks(16, 99)

    def test_loss():
        p = ncp.adapt(model, xt, yt, cfg, steps=4, mode="rescaled").params
        return ncp.losses.mse(ncp.forward(model, p, xt), yt).mean().item()

    before = test_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        x, y = tasks(8, step)
        opt.zero_grad()
        ncp.meta_step(model, (x, y), cfg).loss.backward()
        opt.step()
    assert test_loss() < 0.5 * before


def test_adapt_records_losses_and_kept_indices():
    model = seeded(_models.mlp)
    x, y = data(points=20)
    cfg = ncp.MetaConfig(inner_steps=3, inner_lr=0.4, pruner=ncp.ContextPruner(ratio=0.25))
    pruned = ncp.adapt(model, x, y, cfg, mode="pruned")
    assert isinstance(pruned, ncp.AdaptResult) and pruned.losses.shape == (3, 3)
    assert pruned.kept_indices is not None and pruned.kept_indices.shape == (3, 3, 5)
    # the pruned test-time trajectory is meta_step's inner loop without the graph
    out = ncp.meta_step(model, (x, y), dataclasses.replace(cfg, first_order=True, bootstrap=None))
    assert torch.equal(pruned.kept_indices, out.kept_indices)
    assert_close(pruned.losses, out.inner_losses, **F64)
    for n, v in out.params.items():
        assert_close(pruned.params[n], v.detach(), **F64)
    plain = ncp.adapt(model, x, y, cfg, steps=2)
    assert plain.kept_indices is None and plain.losses.shape == (2, 3)
    rescaled = ncp.adapt(model, x, y, cfg, steps=2, mode="rescaled")
    assert rescaled.kept_indices is not None and rescaled.kept_indices.shape == (2, 3, 5)
    # full-context losses: the first one is the loss of the initialisation on every point
    with torch.no_grad():
        first = ncp.losses.mse(
            ncp.forward(model, ncp.adapt(model, x, y, cfg, steps=0).params, x), y
        ).mean(1)
    assert_close(plain.losses[0], first, **F64)
