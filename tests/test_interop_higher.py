"""ncp.interop.higher: a GradNCP loop written with the real `higher` package gives ncp's numbers."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys
from typing import Dict, List

import pytest

# part of the `test` extra, so CI runs these; a bare GPU machine may lack it
higher = pytest.importorskip("higher")

import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import ncp
from ncp.interop.higher import bootstrap_loss, fast_params, prune, rescale_callback
from tests import _models
from tests._docpages import diff_sides, named_blocks, page_batch, page_model

F64 = dict(rtol=1e-9, atol=1e-11)


def data(tasks=3, points=24, d_in=2, d_out=1, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, points, d_in, generator=g, dtype=dtype) * 2 - 1
    y = torch.rand(tasks, points, d_out, generator=g, dtype=dtype)
    return x, y


def seeded(factory, seed=0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return factory().to(dtype)


MODELS = {
    "mlp": (lambda: _models.mlp(d_out=1), 1),
    "frozen-and-buffer": (lambda: _models.Frozen(d_out=1), 1),
    "sigmoid-head": (lambda: _models.SigmoidHead(d_out=3), 3),
}


def higher_meta_step(
    model: nn.Module, x, y, cfg: ncp.MetaConfig, inner_params=None
) -> Dict[str, object]:
    """GradNCP (or MAML) written as a user would in a higher loop, one task at a time."""
    inner_opt = torch.optim.SGD(
        model.parameters() if inner_params is None else inner_params, lr=cfg.inner_lr
    )
    model.zero_grad(set_to_none=True)
    tasks = x.shape[0]
    total, query, boot, kept = [], [], [], []
    for xi, yi in zip(x, y, strict=True):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
            fmodel,
            diffopt,
        ):
            idx = []
            for _ in range(cfg.inner_steps):
                xs, ys = xi, yi
                if cfg.pruner is not None:
                    xs, ys, i = prune(model, fmodel, xi, yi, cfg.pruner)
                    idx.append(i)
                diffopt.step(F.mse_loss(fmodel(xs), ys))
            q = F.mse_loss(fmodel(xi), yi)
            loss = q
            if cfg.bootstrap is not None:
                term, _ = bootstrap_loss(
                    model, fmodel, xi, yi, cfg.bootstrap, adapt_only=cfg.adapt_only
                )
                boot.append(term.detach())
                loss = loss + term
            (loss / tasks).backward()
            total.append(loss.detach())
            query.append(q.detach())
            kept.append(idx)
    return {
        "loss": torch.stack(total).mean(),
        "query_loss": torch.stack(query),
        "bootstrap_loss": torch.stack(boot) if boot else None,
        "kept": kept,
        "grads": [p.grad for p in model.parameters() if p.requires_grad],
    }


def ncp_meta_step(model: nn.Module, x, y, cfg: ncp.MetaConfig):
    out = ncp.meta_step(model, (x, y), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.loss, params)


def assert_same_kept(kept_higher: List[List[torch.Tensor]], kept_ncp: torch.Tensor) -> None:
    """Same points kept at every step of every task (topk order is unspecified)."""
    for task, steps in enumerate(kept_higher):
        for step, idx in enumerate(steps):
            assert torch.equal(idx.sort().values, kept_ncp[step, task].sort().values)


# --- (1) meta-training: same loss, same meta-gradients as ncp.meta_step ----------------------


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("score", ["gradncp", "loss"])
def test_gradncp_step_in_higher_matches_meta_step(name, score):
    factory, d_out = MODELS[name]
    x, y = data(d_out=d_out, seed=1)
    cfg = ncp.MetaConfig(
        inner_steps=3,
        inner_lr=0.1,
        pruner=ncp.ContextPruner(ratio=0.25, score=score),
        bootstrap=ncp.BootstrapMetaLoss(steps=2, lr=0.05, weight=3.0),
    )
    model = seeded(factory)
    got = higher_meta_step(model, x, y, cfg)
    want, want_grads = ncp_meta_step(copy.deepcopy(seeded(factory)), x, y, cfg)

    assert want.kept_indices is not None and want.bootstrap_loss is not None
    assert_same_kept(got["kept"], want.kept_indices)
    assert_close(got["query_loss"], want.query_loss, **F64)
    assert_close(got["bootstrap_loss"], want.bootstrap_loss, **F64)
    assert_close(got["loss"], want.loss.detach(), **F64)
    assert all(bool(b > 0) for b in want.bootstrap_loss)  # the term is really there
    for g, w in zip(got["grads"], want_grads, strict=True):
        assert g is not None
        assert_close(g, w, **F64)


def test_maml_in_higher_matches_meta_step_without_pruning():
    x, y = data(seed=2)
    cfg = ncp.MetaConfig(inner_steps=3, inner_lr=0.1, pruner=None, bootstrap=None)
    got = higher_meta_step(seeded(_models.mlp), x, y, cfg)
    want, want_grads = ncp_meta_step(seeded(_models.mlp), x, y, cfg)
    assert_close(got["loss"], want.loss.detach(), **F64)
    for g, w in zip(got["grads"], want_grads, strict=True):
        assert_close(g, w, **F64)


def test_inner_optimizer_over_the_head_only_matches_adapt_only():
    x, y = data(seed=3)
    cfg = ncp.MetaConfig(
        inner_steps=2,
        inner_lr=0.1,
        pruner=ncp.ContextPruner(ratio=0.5),
        bootstrap=ncp.BootstrapMetaLoss(steps=2, weight=3.0),
        adapt_only=("4",),
    )
    model = seeded(_models.mlp)
    got = higher_meta_step(model, x, y, cfg, inner_params=model[4].parameters())
    want, want_grads = ncp_meta_step(seeded(_models.mlp), x, y, cfg)
    assert_same_kept(got["kept"], want.kept_indices)
    assert_close(got["bootstrap_loss"], want.bootstrap_loss, **F64)
    for g, w in zip(got["grads"], want_grads, strict=True):
        assert_close(g, w, **F64)


# --- (2) test time: the rescale callback reproduces ncp.adapt ----------------------------------


@pytest.mark.parametrize("mode", ["grad", "loss"])
@pytest.mark.parametrize("copy_initial_weights", [True, False])
@pytest.mark.parametrize("name", ["mlp", "frozen-and-buffer"])
def test_rescale_callback_reproduces_adapt(mode, copy_initial_weights, name):
    factory, d_out = MODELS[name]
    x, y = data(tasks=2, points=32, d_out=d_out, seed=4)
    cfg = ncp.MetaConfig(inner_lr=0.5, pruner=ncp.ContextPruner(ratio=0.25))
    model = seeded(factory)
    rescaler = ncp.GradRescaler(mode=mode)
    want = ncp.adapt(model, x, y, cfg, steps=3, mode=rescaler).params
    plain = ncp.adapt(model, x, y, cfg, steps=3).params

    inner_opt = torch.optim.SGD(model.parameters(), lr=cfg.inner_lr)
    for t, (xi, yi) in enumerate(zip(x, y, strict=True)):
        with higher.innerloop_ctx(
            model, inner_opt, copy_initial_weights=copy_initial_weights, track_higher_grads=False
        ) as (fmodel, diffopt):
            cb = rescale_callback(model, fmodel, xi, yi, cfg.pruner, rescaler=rescaler)
            for _ in range(3):
                diffopt.step(F.mse_loss(fmodel(xi), yi), grad_callback=cb)
            got = fast_params(model, fmodel)
        for n, v in got.items():
            assert_close(v[0], want[n][t], **F64)
            # the rescaling changed the trajectory: the comparison is not vacuous
            assert not torch.allclose(v[0], plain[n][t])


def test_rescale_callback_leaves_frozen_gradients_none_and_scales_the_others():
    model = seeded(lambda: _models.Frozen(d_out=1))
    x, y = data(tasks=1, points=32, seed=5)
    pruner = ncp.ContextPruner(ratio=0.25)
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, _):
        loss = F.mse_loss(fmodel(x[0]), y[0])
        grads = [
            torch.autograd.grad(loss, p, retain_graph=True)[0] if p.requires_grad else None
            for p in fmodel.parameters()
        ]
        out = rescale_callback(model, fmodel, x[0], y[0], pruner)(grads)
        kept = prune(model, fmodel, x[0], y[0], pruner)
        pruned_loss = F.mse_loss(fmodel(kept.x), kept.y)
        trainable = [p for p in fmodel.parameters() if p.requires_grad]
        pruned = torch.autograd.grad(pruned_loss, trainable)
    frozen = [p.requires_grad is False for p in model.parameters()]
    assert any(frozen)
    assert [o is None for o in out] == frozen
    norm = torch.cat([o.flatten() for o in out if o is not None]).norm()
    assert_close(norm, torch.cat([g.flatten() for g in pruned]).norm(), **F64)
    full = [g for g in grads if g is not None]
    factor = norm / torch.cat([g.flatten() for g in full]).norm()
    for o, g in zip([o for o in out if o is not None], full, strict=True):
        assert_close(o, factor * g, **F64)


def test_frozen_weights_that_higher_moved_are_refused():
    # higher 0.2.1 with track_higher_grads=False steps frozen parameters held by the inner
    # optimizer from its second step on; ncp, which reads them from the model, must not go on.
    model = seeded(lambda: _models.Frozen(d_out=1))
    x, y = data(tasks=1, points=16, seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(F.mse_loss(fmodel(x[0]), y[0]))
        assert not torch.equal(fmodel.fast_params[0], model.features.weight)
        with pytest.raises(ValueError, match=r"frozen parameter 'features.weight' differs"):
            prune(model, fmodel, x[0], y[0], ncp.ContextPruner(ratio=0.5))


# --- (3) the bootstrap term from the fast weights ----------------------------------------------


def test_bootstrap_term_equals_ncp_and_its_target_has_no_graph():
    model = seeded(_models.mlp)
    x, y = data(tasks=1, points=20, seed=6)
    boot = ncp.BootstrapMetaLoss(steps=3, lr=0.05, weight=2.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(x[0]), y[0]))
        term, target = bootstrap_loss(model, fmodel, x[0], y[0], boot)
        want_term, want_target = boot(model, fast_params(model, fmodel), x, y)
        term.backward()
    assert term.dim() == 0 and term.grad_fn is not None
    assert_close(term, want_term[0], **F64)
    assert set(target) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        assert target[n].shape == p.shape
        assert not target[n].requires_grad and target[n].grad_fn is None
        assert_close(target[n], want_target[n][0], **F64)
        # the gradient reached the initial weights through the fast weights
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_fast_params_follow_model_parameters_order_and_skip_frozen():
    model = seeded(lambda: _models.Frozen(d_out=1))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, _):
        params = fast_params(model, fmodel)
        fast = list(fmodel.parameters())
    named = list(model.named_parameters())
    assert list(params) == [n for n, p in named if p.requires_grad]
    for (n, p), f in zip(named, fast, strict=True):
        if p.requires_grad:
            assert params[n].shape == (1, *p.shape)
            assert torch.equal(params[n][0], f)
            assert_close(params[n][0], p.detach())
            assert params[n].requires_grad  # still on higher's graph


# --- errors -------------------------------------------------------------------------------------


def test_errors_name_the_argument_and_the_fix():
    model = seeded(_models.mlp)
    x, y = data(tasks=1, points=16)
    pruner = ncp.ContextPruner(ratio=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt) as (fmodel, _):
        with pytest.raises(TypeError, match=r"`fmodel` must be the patched module"):
            prune(model, model, x[0], y[0], pruner)
        with pytest.raises(ValueError, match=r"`fmodel` has 6 fast weights but `model` has 2"):
            prune(nn.Linear(2, 1).double(), fmodel, x[0], y[0], pruner)
        with pytest.raises(ValueError, match=r"`x` and `y` must hold the same points"):
            prune(model, fmodel, x[0], y[0, :5], pruner)
        with pytest.raises(ValueError, match=r"per-point losses of shape \(1, 8\), got \(\)"):
            prune(model, fmodel, x[0], y[0], pruner, loss_fn=lambda p, t: (p - t).pow(2).mean())
        with pytest.raises(ValueError, match=r"keeps 0 of 16 context points"):
            prune(model, fmodel, x[0], y[0], ncp.ContextPruner(ratio=0.01))
        with pytest.raises(TypeError, match=r"`pruner` must be an ncp.ContextPruner"):
            prune(model, fmodel, x[0], y[0], 0.25)
        with pytest.raises(ValueError, match=r"`adapt_only` entries \['head'\] match no"):
            bootstrap_loss(model, fmodel, x[0], y[0], ncp.BootstrapMetaLoss(), adapt_only=["head"])
        cb = rescale_callback(model, fmodel, x[0], y[0], pruner)
        with pytest.raises(ValueError, match=r"got 2 gradients but `model` has 6 parameters"):
            cb([None, None])


# --- (4) and (5): higher is optional and imported lazily ----------------------------------------


def test_missing_higher_raises_an_import_error_that_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "higher", None)  # what `import higher` sees when absent
    monkeypatch.delitem(sys.modules, "ncp.interop.higher")
    with pytest.raises(ImportError) as info:
        importlib.import_module("ncp.interop.higher")
    assert str(info.value) == (
        "`ncp.interop.higher` needs the optional dependency 'higher': pip install \"ncp[higher]\""
    )
    assert isinstance(info.value.__cause__, ImportError)


def test_import_ncp_does_not_import_higher():
    code = (
        "import sys, ncp, ncp.interop, ncp.functional, ncp.losses; "
        "print(sorted(m for m in sys.modules if m == 'higher' or m.startswith('higher.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# --- the docs page's code ------------------------------------------------------------------------


def _page_meta_grads(code: str, x, y):
    ns = {"make_model": page_model, "loader": [(x, y)]}
    exec(code, ns)
    return ns, [p.grad for p in ns["model"].parameters()]


def test_docs_page_diff_gives_meta_step_gradients_and_test_time_gives_adapt():
    blocks = named_blocks("interop_higher.md")
    old, new = diff_sides(blocks["higher-diff"])
    assert old == blocks["higher-before"]
    x, y = page_batch(1)
    tol = dict(rtol=1e-4, atol=1e-6)  # float32, as on the page

    _, before = _page_meta_grads(blocks["higher-before"], x, y)
    maml = ncp.MetaConfig(inner_steps=4, pruner=None, bootstrap=None)
    for g, w in zip(before, ncp_meta_step(page_model(), x, y, maml)[1], strict=True):
        assert_close(g, w, **tol)

    ns, after = _page_meta_grads(new, x, y)
    cfg = ncp.MetaConfig(
        inner_steps=16, inner_lr=1e-2, pruner=ns["pruner"], bootstrap=ns["bootstrap"]
    )
    for g, w in zip(after, ncp_meta_step(page_model(), x, y, cfg)[1], strict=True):
        assert_close(g, w, **tol)

    x_test, y_test = page_batch(2, tasks=2)
    ns.update(x_test=x_test, y_test=y_test)
    exec(blocks["higher-test-time"], ns)
    adapted = ncp.adapt(ns["model"], x_test, y_test, cfg, steps=16, mode="rescaled").params
    assert_close(torch.stack(ns["preds"]), ncp.forward(ns["model"], adapted, x_test), **tol)


def test_docs_classification_block_equals_meta_step_with_balanced_pruning():
    """The page's maml-omniglot-style loop: Conv4 with batch norm that keeps no running
    statistics, cross-entropy, class-balanced pruning with a selector prepared per task."""
    code = named_blocks("interop_higher.md")["higher-classification"]
    g = torch.Generator().manual_seed(0)
    ways, shots, tasks = 3, 4, 2
    xs = torch.randn(tasks, ways * shots, 1, 8, 8, generator=g, dtype=torch.float64)
    ys = torch.stack([torch.randperm(ways * shots, generator=g) % ways for _ in range(tasks)])
    xq = torch.randn(tasks, ways * 2, 1, 8, 8, generator=g, dtype=torch.float64)
    yq = torch.arange(ways).repeat(2).expand(tasks, -1)

    def conv4():
        torch.manual_seed(0)
        return _models.Conv4(classes=ways, norm="bn").double()

    model = conv4()
    ns = {
        "ncp": ncp,
        "ncp_higher": importlib.import_module("ncp.interop.higher"),
        "higher": higher,
        "F": F,
        "model": model,
        "ways": ways,
        "episodes": [(xs, ys, xq, yq)],
        "meta_opt": torch.optim.SGD(model.parameters(), lr=0.0),
        "inner_opt": torch.optim.SGD(model.parameters(), lr=1e-2),
    }
    exec(code, ns)
    got = [p.grad for p in model.parameters()]
    ref = conv4()
    cfg = ncp.MetaConfig(
        inner_steps=8,
        pruner=ns["pruner"],
        bootstrap=None,
        loss_fn=ncp.losses.cross_entropy,
    )
    ncp.meta_step(ref, (xs, ys, xq, yq), cfg).loss.backward()
    for a, b in zip(got, [p.grad for p in ref.parameters()], strict=True):
        assert_close(a, b, rtol=1e-6, atol=1e-9)
