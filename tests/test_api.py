"""The 0.2 seams: a pruner prepared once (Selector), one rescaling step, adapt's modes, the
loss in the config, and the messages of a new user's wrong turns."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import ncp
from tests import _models

F64 = dict(rtol=1e-6, atol=1e-8)


def data(tasks=2, points=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, points, 2, generator=g, dtype=torch.float64) * 2 - 1
    return x, torch.sin(3 * x[..., :1]) + 0.1 * torch.rand(tasks, points, 1, generator=g)


def model64(factory=_models.mlp):
    torch.manual_seed(0)
    return factory().double()


def test_selector_plans_once_and_selects_like_the_pruner():
    model, (x, y) = model64(), data()
    pruner = ncp.ContextPruner(ratio=0.25)
    select = pruner.prepare(model, x, y)
    assert (select.k, select.points, select.head, select.strategy) == (6, 24, "4", "vmap")
    params = ncp.functional.init_params(model, 2)
    moved = {k: v + 0.05 for k, v in params.items()}
    for p in (params, moved):
        got, want = select(p, x, y), pruner(model, x, y, params=p)
        assert torch.equal(got.indices.sort(1).values, want.indices.sort(1).values)
        assert_close(select.scores(p, x, y), pruner.scores(model, x, y, params=p))


@pytest.mark.parametrize(
    "pruner, strategy",
    [
        (ncp.ContextPruner(score="loss"), "loss"),
        (ncp.ContextPruner(score="random"), "random"),
        (ncp.ContextPruner(strategy="exact"), "exact"),
        (ncp.ContextPruner(strategy="vmap"), "vmap"),
    ],
)
def test_strategy_is_decided_when_prepared(pruner, strategy):
    model, (x, y) = model64(), data()
    assert pruner.prepare(model, x, y).strategy == strategy


def test_conv_head_is_planned_exact():
    model = model64(_models.ConvHead)
    x, y = torch.randn(2, 7, 2, dtype=torch.float64), torch.rand(2, 7, 3, dtype=torch.float64)
    assert ncp.ContextPruner().prepare(model, x, y).strategy == "exact"


def test_hand_written_loop_with_the_blocks_equals_meta_step():
    """Only public names: the pruner prepared once, the functional inner step, the bootstrap."""
    model, (x, y) = model64(), data()
    pruner = ncp.ContextPruner(ratio=0.25)
    boot = ncp.BootstrapMetaLoss(steps=2, lr=0.05, weight=10.0)
    cfg = ncp.MetaConfig(inner_steps=3, inner_lr=0.1, pruner=pruner, bootstrap=boot)
    out = ncp.meta_step(model, (x, y), cfg)
    want = torch.autograd.grad(out.loss, list(model.parameters()))

    params = ncp.functional.init_params(model, x.shape[0])
    select = pruner.prepare(model, x, y)
    for _ in range(3):
        kept = select(params, x, y)
        grads, _ = ncp.functional.task_gradients(
            model, params, kept.x, kept.y, ncp.losses.mse, create_graph=True
        )
        params = ncp.functional.sgd_update(params, grads, 0.1)
    term, _ = boot(model, params, x, y)
    query = ncp.functional.task_losses(model, params, x, y, ncp.losses.mse)
    got = torch.autograd.grad((query + term).mean(), list(model.parameters()))
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, **F64)


@pytest.mark.parametrize("mode", ["grad", "loss"])
def test_rescale_is_the_step_adapt_takes(mode):
    model, (x, y) = model64(), data()
    cfg = ncp.MetaConfig(pruner=ncp.ContextPruner(ratio=0.25), inner_lr=0.1)
    rescaler = ncp.GradRescaler(mode=mode)
    got = ncp.adapt(model, x, y, cfg, steps=1, mode=rescaler)
    params = ncp.functional.init_params(model, 2, detach=True)
    kept = cfg.pruner.prepare(model, x, y)(params, x, y)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    full, _ = ncp.functional.task_gradients(model, leaves, x, y, ncp.losses.mse, create_graph=False)
    step = rescaler.rescale(model, params, full, kept.x, kept.y, loss_fn=ncp.losses.mse, x=x, y=y)
    for name in params:
        assert_close(got.params[name], params[name] - 0.1 * step[name], **F64)
    assert torch.equal(got.kept_indices[0], kept.indices)
    assert not torch.allclose(step["4.bias"], full["4.bias"])


def test_adapt_modes_differ_and_rescaled_default_is_grad_mode():
    model, (x, y) = model64(), data()
    cfg = ncp.MetaConfig(pruner=ncp.ContextPruner(ratio=0.25), inner_lr=0.1)
    runs = {
        m: ncp.adapt(model, x, y, cfg, steps=2, mode=m).params
        for m in ("full", "pruned", "rescaled")
    }
    explicit = ncp.adapt(model, x, y, cfg, steps=2, mode=ncp.GradRescaler(mode="grad")).params
    assert_close(runs["rescaled"]["0.weight"], explicit["0.weight"], **F64)
    assert not torch.allclose(runs["full"]["0.weight"], runs["pruned"]["0.weight"])
    assert not torch.allclose(runs["full"]["0.weight"], runs["rescaled"]["0.weight"])


def test_loss_fn_in_the_config_is_used_by_meta_step_and_adapt():
    torch.manual_seed(0)
    model = _models.mlp(d_out=3).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 12), generator=g)
    base = ncp.MetaConfig(inner_steps=2, pruner=ncp.ContextPruner(ratio=0.5), bootstrap=None)
    cfg = dataclasses.replace(base, loss_fn=ncp.losses.cross_entropy)
    a = ncp.meta_step(model, (x, y), cfg).loss
    b = ncp.meta_step(model, (x, y), base, loss_fn=ncp.losses.cross_entropy).loss
    assert_close(a, b, **F64)
    got = ncp.adapt(model, x, y, cfg, steps=2, mode="rescaled").params
    want = ncp.adapt(model, x, y, base, steps=2, mode="rescaled", loss_fn=ncp.losses.cross_entropy)
    assert_close(got["0.weight"], want.params["0.weight"], **F64)


def test_config_shows_its_default_values():
    text = repr(ncp.MetaConfig())
    assert "pruner=ContextPruner(ratio=0.25" in text and "<factory>" not in text
    with pytest.raises(TypeError, match=r"`MetaConfig.loss_fn` must be a per-point loss"):
        ncp.MetaConfig(loss_fn="mse")  # type: ignore[arg-type]


def test_integer_labels_with_the_default_mse_point_to_cross_entropy():
    torch.manual_seed(0)
    model = _models.mlp(d_out=3)
    x, y = torch.randn(2, 12, 2), torch.randint(0, 3, (2, 12))
    with pytest.raises(ValueError, match=r"look like class labels; pass loss_fn=ncp.losses.cross"):
        ncp.meta_step(model, (x, y), ncp.MetaConfig(inner_steps=1, pruner=None, bootstrap=None))


def test_torch_functional_loss_gets_ncp_explanation():
    torch.manual_seed(0)
    model = _models.mlp(d_out=5)
    x, y = torch.randn(2, 8, 2), torch.randint(0, 5, (2, 8))
    cfg = ncp.MetaConfig(inner_steps=1, pruner=None, bootstrap=None, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match=r"`loss_fn` \(cross_entropy\) failed .* use ncp.losses"):
        ncp.meta_step(model, (x, y), cfg)


def test_missing_task_dimension_is_named_in_the_pruner_error():
    model = _models.mlp(d_out=2)
    x, y = torch.rand(40, 2), torch.rand(40, 2)  # one task's points, no task dimension
    with pytest.raises(ValueError, match=r"keeps 0 of 2 context points.*x.unsqueeze\(0\)"):
        ncp.ContextPruner(ratio=0.25)(model, x, y)
    with pytest.raises(ValueError, match=r"add the task dimension: x.unsqueeze\(0\)"):
        ncp.ContextPruner(ratio=0.25)(model, x, y[:, :1])


def test_higher_prune_accepts_a_prepared_selector():
    higher = pytest.importorskip("higher")
    from ncp.interop.higher import prune

    model, (x, y) = model64(), data(tasks=1)
    pruner = ncp.ContextPruner(ratio=0.25)
    select = pruner.prepare(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, _):
        a = prune(model, fmodel, x[0], y[0], select)
        b = prune(model, fmodel, x[0], y[0], pruner)
        assert torch.equal(a.indices.sort().values, b.indices.sort().values)
        with pytest.raises(ValueError, match=r"prepared for 24 context points but `x` holds 12"):
            prune(model, fmodel, x[0, :12], y[0, :12], select)
        with pytest.raises(ValueError, match=r"prepared for another model"):
            prune(model, fmodel, x[0], y[0], pruner.prepare(model64(), x, y))


def test_plan_memory_finds_the_longest_horizon_within_maml_memory():
    torch.manual_seed(0)
    model = _models.mlp(hidden=32)
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(2, 256, 2, generator=g), torch.rand(2, 256, 1, generator=g))
    maml = ncp.MetaConfig(inner_steps=2, pruner=None, bootstrap=None)
    gradncp = ncp.MetaConfig(pruner=ncp.ContextPruner(ratio=0.25), bootstrap=None)
    plan = ncp.plan_memory(model, batch, gradncp, budget=maml, max_steps=40)
    k = plan.cfg.inner_steps
    assert plan.budget == ncp.functional.saved_bytes(model, batch, maml)
    assert plan.saved_bytes <= plan.budget
    longer = dataclasses.replace(gradncp, inner_steps=k + 1)
    assert ncp.functional.saved_bytes(model, batch, longer) > plan.budget
    assert 6 <= k <= 10  # about MAML's K / ratio = 8
    assert all(p.grad is None for p in model.parameters())  # nothing written on the model


def test_plan_memory_largest_ratio_and_errors():
    torch.manual_seed(0)
    model = _models.mlp(hidden=32)
    batch = (torch.rand(1, 200, 2), torch.rand(1, 200, 1))
    cfg = ncp.MetaConfig(inner_steps=4, pruner=ncp.ContextPruner(ratio=0.5), bootstrap=None)
    full = ncp.functional.saved_bytes(model, batch, dataclasses.replace(cfg, pruner=None))
    plan = ncp.plan_memory(model, batch, cfg, budget=full // 2, vary="ratio")
    kept = ncp.functional.keep_count(plan.cfg.pruner.ratio, 200)
    assert (
        plan.saved_bytes
        <= full // 2
        < ncp.functional.saved_bytes(
            model, batch, dataclasses.replace(cfg, pruner=ncp.ContextPruner(ratio=(kept + 1) / 200))
        )
    )
    assert 60 <= kept <= 110
    with pytest.raises(ValueError, match=r"nothing fits the budget of 10 bytes"):
        ncp.plan_memory(model, batch, cfg, budget=10)
    with pytest.raises(ValueError, match=r"`budget`='device' reads the free memory"):
        ncp.plan_memory(model, batch, cfg, budget="device")
    with pytest.raises(ValueError, match=r"`budget` must be a number of bytes"):
        ncp.plan_memory(model, batch, cfg, budget=-3)


def test_quickstart_blocks_loop_reaches_the_meta_step_gradient():
    from tests._docpages import named_blocks, page_batch, page_model

    code = named_blocks("quickstart.md")["quickstart-blocks"]
    model = page_model().double()
    x, y = (t.double() for t in page_batch(3))
    ns = {"ncp": ncp, "model": model, "x": x, "y": y}
    exec(code, ns)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    cfg = ncp.MetaConfig(inner_steps=16, inner_lr=1e-2)  # the paper's defaults, as the page
    ncp.meta_step(model, (x, y), cfg).loss.backward()
    for a, b in zip(got, [p.grad for p in model.parameters()], strict=True):
        assert_close(a, b, **F64)


def test_concepts_reptile_loop_moves_theta0_toward_the_adapted_parameters():
    from tests._docpages import named_blocks, page_batch, page_model

    model = page_model().double()
    x, y = (t.double() for t in page_batch(4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ns = {"ncp": ncp, "torch": torch, "model": model, "loader": [(x, y)], "opt": opt}
    exec(named_blocks("concepts.md")["concepts-reptile"], ns)
    # by hand: 32 full-context SGD steps per task from theta_0, then theta_0 += 0.5 (mean - theta_0)
    cfg = ncp.MetaConfig(inner_steps=32, inner_lr=1e-2, pruner=None, bootstrap=None)
    page = page_model().double()
    adapted = ncp.adapt(page, x, y, cfg).params
    for name, p in model.named_parameters():
        want = before[name] + 0.5 * (adapted[name].mean(0) - before[name])
        assert_close(p.detach(), want, **F64)
        assert not torch.equal(p.detach(), before[name])


def test_saved_bytes_with_learned_rates_writes_no_gradient():
    torch.manual_seed(0)
    model = _models.mlp()
    batch = (torch.rand(2, 64, 2), torch.rand(2, 64, 1))
    cfg = ncp.MetaConfig(inner_steps=3, pruner=None, bootstrap=None)
    rates = ncp.LearnedLR(model, steps=3)
    with_rates = ncp.functional.saved_bytes(model, batch, cfg, learned_lr=rates)
    plain = ncp.functional.saved_bytes(model, batch, cfg)
    assert with_rates >= plain > 0
    assert all(p.grad is None for p in [*model.parameters(), *rates.parameters()])


def test_passing_a_result_instead_of_its_params_names_the_fix():
    model, (x, y) = model64(), data()
    out = ncp.adapt(model, x, y, ncp.MetaConfig(pruner=None), steps=1)
    with pytest.raises(TypeError, match=r"got AdaptResult. Pass its `.params`"):
        ncp.forward(model, out, x)  # type: ignore[arg-type]


def test_meta_step_with_the_vectorised_strategy_equals_the_loop():
    model, (x, y) = model64(), data(tasks=3)
    grads = {}
    for strategy in ("loop", "vmap"):
        cfg = ncp.MetaConfig(inner_steps=3, pruner=ncp.ContextPruner(strategy=strategy))
        out = ncp.meta_step(model, (x, y), cfg)
        grads[strategy] = (
            out.kept_indices,
            torch.autograd.grad(out.loss, list(model.parameters())),
        )
    assert torch.equal(grads["loop"][0].sort(-1).values, grads["vmap"][0].sort(-1).values)
    for a, b in zip(grads["loop"][1], grads["vmap"][1], strict=True):
        assert_close(a, b, **F64)
    with pytest.raises(ValueError, match=r"`ContextPruner.strategy` must be one of"):
        ncp.ContextPruner(strategy="fast")  # type: ignore[arg-type]


def test_auto_strategy_on_cpu_vectorises_small_contexts_and_loops_over_large_ones():
    model = model64()  # widest per-point activation: 16
    pruner = ncp.ContextPruner(ratio=0.25)
    small = pruner.prepare(model, *data(tasks=25, points=100))
    assert small.strategy == "vmap"  # 25 x 100 x 16 = 40,000 elements
    big = torch.zeros(2, ncp._scoring.CPU_VMAP_ELEMENTS // 16 + 1, 2, dtype=torch.float64)
    large = pruner.prepare(model, big, big[..., :1])
    assert large.strategy == "loop"
    no_vmap = ncp.ContextPruner(ratio=0.25).prepare(
        model, *data(tasks=25, points=100), vmap_tasks=False
    )
    assert no_vmap.strategy == "loop"


def test_pruning_a_small_context_warns_once_with_the_alternative():
    model, (x, y) = model64(), data(tasks=2, points=24)
    with pytest.warns(ncp.SmallContextWarning, match=r"keeps 6 of 24 context points.*pruner=None"):
        ncp.ContextPruner(ratio=0.25).prepare(model, x, y)
    with pytest.warns(ncp.SmallContextWarning) as record:  # pointed at the caller's line
        ncp.meta_step(model, (x, y), ncp.MetaConfig(inner_steps=1, bootstrap=None))
    assert record[0].filename == __file__
    big = torch.zeros(2, 64, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ncp.SmallContextWarning)
        ncp.ContextPruner(ratio=0.25).prepare(model, big, big[..., :1])  # 64 points: no warning
