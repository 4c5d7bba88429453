"""ncp with the models other MAML codebases have: learn2learn-style clones, torchmeta-style
``forward(x, params=None)`` modules, functions of a weight list (``FunctionalModel``), and
adapting a subset of the parameters (``MetaConfig.adapt_only``, latent modulations).

Every gradient comparison is in float64 against a hand-written unroll.
"""

from __future__ import annotations

import re
import sys
import types
from collections import OrderedDict
from typing import Callable, Dict, List, Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call
from torch.testing import assert_close

import ncp
from ncp.interop import modules as interop_modules
from ncp.interop.modules import FunctionalModel, params_of
from tests import _models
from tests._docpages import DOCS, diff_sides, named_blocks

D = torch.float64


def _data(seed: int, tasks: int = 3, points: int = 24, d_in: int = 2, d_out: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, points, d_in, generator=g, dtype=D) * 2 - 1
    y = torch.rand(tasks, points, d_out, generator=g, dtype=D)
    return x, y


def _mlp(seed: int = 0, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return _models.mlp(d_in=2, d_out=d_out, hidden=8).to(D)


def _trainable(model: nn.Module) -> List[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _meta_grads(loss: Tensor, model: nn.Module) -> List[Tensor]:
    return list(torch.autograd.grad(loss, _trainable(model), retain_graph=True))


def _assert_all_close(got: Sequence[Tensor], want: Sequence[Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


def _no_hooks(*modules: nn.Module) -> bool:
    return all(not m._forward_hooks for module in modules for m in module.modules())


# --- a hand-written unroll for any forward function (the reference) ----------------------------


def unroll(
    forward: Callable[[Tensor, Dict[str, Tensor]], Tensor],
    theta0: Dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float,
    adapt: Sequence[str] | None = None,
    kept: Tensor | None = None,
    boot: ncp.BootstrapMetaLoss | None = None,
    first_order: bool = False,
) -> Tensor:
    """MAML / GradNCP outer loss, one task at a time: ``steps`` SGD steps on the ``adapt``
    parameters only (default all), on ``kept[k, i]`` points at step ``k`` when given, then the
    full-context loss plus the bootstrap term over the adapted parameters."""
    adapt = list(theta0) if adapt is None else list(adapt)
    totals = []
    for i in range(x.shape[0]):
        params = dict(theta0)
        for k in range(steps):
            xs, ys = x[i], y[i]
            if kept is not None:
                xs, ys = xs[kept[k, i]], ys[kept[k, i]]
            at = (
                {n: v.detach().requires_grad_(True) for n, v in params.items()}
                if first_order
                else params
            )
            inner = F.mse_loss(forward(xs, at), ys)
            grads = torch.autograd.grad(inner, [at[n] for n in adapt], create_graph=not first_order)
            for n, g in zip(adapt, grads, strict=True):
                params[n] = params[n] - lr * g
        total = F.mse_loss(forward(x[i], params), y[i])
        if boot is not None:
            target = {n: v.detach() for n, v in params.items()}
            for _ in range(boot.steps):
                leaves = {n: v.detach().requires_grad_(n in adapt) for n, v in target.items()}
                loss = F.mse_loss(forward(x[i], leaves), y[i])
                gs = torch.autograd.grad(loss, [leaves[n] for n in adapt])
                for n, g in zip(adapt, gs, strict=True):
                    target[n] = (leaves[n] - boot.lr * g).detach()
            sq = sum((params[n] - target[n]).pow(2).sum() for n in adapt)
            assert isinstance(sq, Tensor)
            total = total + boot.weight * sq.sqrt()
        totals.append(total)
    return torch.stack(totals).mean()


def _module_forward(model: nn.Module) -> Callable[[Tensor, Dict[str, Tensor]], Tensor]:
    return lambda x, p: functional_call(model, p, (x,))


def _theta0(model: nn.Module) -> Dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_reference_unroll_reproduces_meta_step_on_a_plain_module():
    # The reference itself, against ncp with the full GradNCP step on an ordinary nn.Module.
    model, (x, y) = _mlp(), _data(0)
    boot = ncp.BootstrapMetaLoss(steps=2, lr=0.05, weight=3.0)
    cfg = ncp.MetaConfig(
        inner_steps=2, inner_lr=0.1, pruner=ncp.ContextPruner(ratio=0.5), bootstrap=boot
    )
    out = ncp.meta_step(model, (x, y), cfg)
    want = unroll(
        _module_forward(model),
        _theta0(model),
        x,
        y,
        steps=2,
        lr=0.1,
        kept=out.kept_indices,
        boot=boot,
    )
    assert_close(out.loss, want)
    _assert_all_close(_meta_grads(out.loss, model), _meta_grads(want, model))


# --- 1. learn2learn-style clone / adapt loops ---------------------------------------------------
#
# learn2learn 0.2.0 does not build on Python 3.11 (its pre-generated Cython sources include
# longintrepr.h), so this is a small stand-in of its mechanism: a clone is a shallow copy of
# every submodule whose ``_parameters`` hold non-leaf tensors computed from the original
# parameters, and ``adapt`` replaces them with ``p - lr * g``. The tests also run on the real
# package where it is installed.


def clone_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are ``p.clone()``: non-leaf, graph to ``p``."""
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = OrderedDict(
        (k, None if p is None else p.clone()) for k, p in module._parameters.items()
    )
    clone._buffers = module._buffers.copy()
    clone._modules = OrderedDict(
        (k, None if m is None else clone_module(m)) for k, m in module._modules.items()
    )
    return clone


def update_module(module: nn.Module, grads: Sequence[Tensor], lr: float) -> None:
    """Replace every trainable ``_parameters`` entry by ``p - lr * g``, in parameters() order."""
    slots = [
        (m, k)
        for m in module.modules()
        for k, p in m._parameters.items()
        if p is not None and p.requires_grad
    ]
    assert len(slots) == len(grads)
    for (m, k), g in zip(slots, grads, strict=True):
        m._parameters[k] = m._parameters[k] - lr * g


class MAML(nn.Module):
    """Stand-in for ``learn2learn.algorithms.MAML``: ``clone()`` and ``adapt(loss)``."""

    def __init__(self, module: nn.Module, lr: float, first_order: bool = False) -> None:
        super().__init__()
        self.module = module
        self.lr = lr
        self.first_order = first_order

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def clone(self) -> MAML:
        return MAML(clone_module(self.module), self.lr, self.first_order)

    def adapt(self, loss: Tensor) -> None:
        params = [p for p in self.module.parameters() if p.requires_grad]
        second = not self.first_order
        grads = torch.autograd.grad(loss, params, create_graph=second, retain_graph=second)
        update_module(self.module, grads, self.lr)


def _standin_l2l() -> types.ModuleType:
    l2l = types.ModuleType("learn2learn")
    l2l.algorithms = types.SimpleNamespace(MAML=MAML)  # type: ignore[attr-defined]
    return l2l


def _l2l(impl: str):
    if impl == "stand-in":
        return _standin_l2l()
    return pytest.importorskip("learn2learn")


IMPLS = ["stand-in", "learn2learn"]


def clone_loop(
    maml: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    pruner: ncp.ContextPruner | None,
    boot: ncp.BootstrapMetaLoss | None,
):
    """GradNCP written as a learn2learn loop, one task at a time; returns the outer loss and
    the kept indices ``(steps, tasks, k)``."""
    total, kept_all = x.new_zeros(()), []
    for xi, yi in zip(x, y, strict=True):
        learner = maml.clone()
        kept_task = []
        for _ in range(steps):
            xs, ys = xi, yi
            if pruner is not None:
                kept = pruner(learner, xi[None], yi[None])
                xs, ys = kept.x[0], kept.y[0]
                kept_task.append(kept.indices[0])
            learner.adapt(F.mse_loss(learner(xs), ys))
        loss = F.mse_loss(learner(xi), yi)
        if boot is not None:
            term, _ = boot(learner, params_of(learner), xi[None], yi[None])
            loss = loss + term[0]
        total = total + loss / len(x)
        kept_all.append(torch.stack(kept_task) if kept_task else None)
    kept_t = torch.stack(kept_all, dim=1) if pruner is not None else None
    return total, kept_t


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_gradncp_as_a_clone_loop_matches_meta_step(impl, first_order):
    l2l = _l2l(impl)
    model, (x, y) = _mlp(1), _data(1)
    pruner = ncp.ContextPruner(ratio=0.5)
    boot = ncp.BootstrapMetaLoss(steps=3, lr=0.05, weight=2.0)
    maml = l2l.algorithms.MAML(model, lr=0.1, first_order=first_order)
    loss, kept = clone_loop(maml, x, y, steps=3, pruner=pruner, boot=boot)

    cfg = ncp.MetaConfig(
        inner_steps=3, inner_lr=0.1, first_order=first_order, pruner=pruner, bootstrap=boot
    )
    out = ncp.meta_step(model, (x, y), cfg)
    assert_close(loss, out.loss)
    assert out.kept_indices is not None and kept is not None
    assert torch.equal(kept.sort(-1).values, out.kept_indices.sort(-1).values)
    _assert_all_close(_meta_grads(loss, model), _meta_grads(out.loss, model))
    assert _no_hooks(model)


@settings(max_examples=10)
@given(
    seed=st.integers(0, 2**16),
    ratio=st.sampled_from([0.25, 0.5, 1.0]),
    tasks=st.integers(1, 3),
    steps=st.integers(1, 3),
)
def test_clone_loop_matches_meta_step_for_drawn_shapes(seed, ratio, tasks, steps):
    model, (x, y) = _mlp(seed % 7), _data(seed, tasks=tasks, points=16)
    pruner, boot = ncp.ContextPruner(ratio=ratio), ncp.BootstrapMetaLoss(steps=2, weight=1.0)
    loss, _ = clone_loop(MAML(model, lr=0.05), x, y, steps=steps, pruner=pruner, boot=boot)
    cfg = ncp.MetaConfig(inner_steps=steps, inner_lr=0.05, pruner=pruner, bootstrap=boot)
    out = ncp.meta_step(model, (x, y), cfg)
    assert_close(loss, out.loss)
    _assert_all_close(_meta_grads(loss, model), _meta_grads(out.loss, model))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("score", ["gradncp", "loss"])
def test_pruner_on_a_clone_scores_its_current_tensors(impl, score):
    l2l = _l2l(impl)
    model, (x, y) = _mlp(2), _data(2, tasks=1, points=20)
    learner = l2l.algorithms.MAML(model, lr=0.1).clone()
    for _ in range(2):
        learner.adapt(F.mse_loss(learner(x[0]), y[0]))
    before = {n: p for n, p in learner.named_parameters()}
    assert all(not p.is_leaf for p in before.values())

    pruner = ncp.ContextPruner(ratio=0.25, score=score)
    kept = pruner(learner, x, y)
    # The same two steps through ncp, on the original model.
    adapted = ncp.adapt(model, x, y, ncp.MetaConfig(inner_lr=0.1, pruner=None), steps=2).params
    assert_close(pruner.scores(learner, x, y), pruner.scores(model, x, y, params=adapted))
    expected = pruner(model, x, y, params=adapted)
    assert torch.equal(kept.indices.sort(-1).values, expected.indices.sort(-1).values)
    assert torch.equal(kept.x, x[0, kept.indices[0]].unsqueeze(0))
    # nothing written on the clone or the model
    after = dict(learner.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert _no_hooks(model, learner)


@pytest.mark.parametrize("impl", IMPLS)
def test_bootstrap_on_params_of_a_clone_equals_meta_step(impl):
    l2l = _l2l(impl)
    model, (x, y) = _mlp(3), _data(3, tasks=1)
    boot = ncp.BootstrapMetaLoss(steps=3, lr=0.05, weight=5.0)
    learner = l2l.algorithms.MAML(model, lr=0.1).clone()
    for _ in range(2):
        learner.adapt(F.mse_loss(learner(x[0]), y[0]))
    term, target = boot(learner, params_of(learner), x, y)

    out = ncp.meta_step(
        model, (x, y), ncp.MetaConfig(inner_steps=2, inner_lr=0.1, pruner=None, bootstrap=boot)
    )
    assert out.bootstrap_loss is not None and out.bootstrap_target is not None
    assert_close(term, out.bootstrap_loss)
    assert {n.removeprefix("module."): t for n, t in target.items()}.keys() == set(
        out.bootstrap_target
    )
    for name, t in target.items():
        assert not t.requires_grad
        assert_close(t, out.bootstrap_target[name.removeprefix("module.")])
    _assert_all_close(_meta_grads(term.sum(), model), _meta_grads(out.bootstrap_loss.sum(), model))


def test_params_of_is_a_view_of_the_clone_with_its_graph():
    model = _mlp(4)
    learner = MAML(model, lr=0.1).clone()
    x, y = _data(4, tasks=1)
    learner.adapt(F.mse_loss(learner(x[0]), y[0]))
    params = params_of(learner, tasks=2)
    current = dict(learner.named_parameters())
    assert list(params) == list(current)
    for name, p in params.items():
        assert p.shape == (2, *current[name].shape)
        assert p.data_ptr() == current[name].data_ptr()  # expanded, not copied
        assert p.requires_grad and not p.is_leaf
    # its gradient reaches the original parameters exactly as the clone's own tensors' does
    name = "module.2.weight"
    _assert_all_close(
        _meta_grads(params[name].sum(), model), _meta_grads(2 * current[name].sum(), model)
    )


def test_params_of_skips_frozen_tensors_and_validates_its_arguments():
    model = _models.Frozen().to(D)
    params = params_of(model)
    assert set(params) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "features.weight" not in params and "scale" not in params
    with pytest.raises(TypeError, match=r"`module` must be an nn.Module, got dict"):
        params_of(dict(model.named_parameters()))  # type: ignore[arg-type]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match=r"`tasks` must be an int >= 1"):
            params_of(model, tasks=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no trainable tensors"):
        params_of(nn.Linear(2, 1).requires_grad_(False))


# --- 2a. torchmeta-style MetaModules: forward(x, params=None) ----------------------------------


class MetaModule(nn.Module):
    """torchmeta's MetaModule, reduced: ``params`` is an OrderedDict of named tensors or None."""

    def meta_named_parameters(self):
        return self.named_parameters()

    def get_subdict(self, params, key):
        if params is None:
            return None
        return OrderedDict(
            (n[len(key) + 1 :], v) for n, v in params.items() if n.startswith(key + ".")
        )


class MetaLinear(nn.Linear, MetaModule):
    def forward(self, x, params=None):
        if params is None:
            params = OrderedDict(self.named_parameters())
        return F.linear(x, params["weight"], params.get("bias"))


class MetaSequential(nn.Sequential, MetaModule):
    def forward(self, x, params=None):
        for name, module in self._modules.items():
            if isinstance(module, MetaModule):
                x = module(x, params=self.get_subdict(params, name))
            else:
                x = module(x)
        return x


def _meta_mlp(seed: int = 0) -> MetaSequential:
    torch.manual_seed(seed)
    return MetaSequential(
        MetaLinear(2, 8), nn.Tanh(), MetaLinear(8, 8), nn.Tanh(), MetaLinear(8, 3)
    ).to(D)


@pytest.mark.parametrize(
    "ratio, with_boot", [(None, False), (None, True), (0.5, False), (0.25, True)]
)
def test_meta_module_works_with_meta_step_and_matches_an_unroll_through_params(ratio, with_boot):
    model, (x, y) = _meta_mlp(5), _data(5)
    boot = ncp.BootstrapMetaLoss(steps=2, lr=0.05, weight=2.0) if with_boot else None
    pruner = ncp.ContextPruner(ratio=ratio) if ratio is not None else None
    cfg = ncp.MetaConfig(inner_steps=3, inner_lr=0.1, pruner=pruner, bootstrap=boot)
    out = ncp.meta_step(model, (x, y), cfg)

    # the unroll the user already has: model(x, params=OrderedDict(...))
    theta0 = OrderedDict(model.meta_named_parameters())
    want = unroll(
        lambda xs, p: model(xs, params=OrderedDict(p)),
        theta0,
        x,
        y,
        steps=3,
        lr=0.1,
        kept=out.kept_indices,
        boot=boot,
    )
    assert_close(out.loss, want)
    _assert_all_close(_meta_grads(out.loss, model), _meta_grads(want, model))


def test_meta_module_gradncp_scores_equal_those_of_the_plain_module():
    meta = _meta_mlp(6)
    plain = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    plain.to(D).load_state_dict(meta.state_dict())
    x, y = _data(6)
    pruner = ncp.ContextPruner(ratio=0.25)
    assert_close(pruner.scores(meta, x, y), pruner.scores(plain, x, y))
    assert ncp.functional.find_head(meta, _theta0(meta), x[0]) == "4"


class PositionalMetaSequential(MetaSequential):
    """A MetaModule container that passes ``params`` positionally: ``layer(x, None)``."""

    def forward(self, x, params=None):
        for name, module in self._modules.items():
            x = (
                module(x, self.get_subdict(params, name))
                if isinstance(module, MetaModule)
                else module(x)
            )
        return x


def test_meta_module_passing_params_positionally_needs_the_loss_score():
    # The GradNCP score hooks the head's positional inputs; ``layer(x, None)`` gives two.
    torch.manual_seed(7)
    model = PositionalMetaSequential(MetaLinear(2, 8), nn.Tanh(), MetaLinear(8, 3)).to(D)
    x, y = _data(7)
    with pytest.raises(ValueError, match=r"must take one tensor and return one tensor"):
        ncp.ContextPruner()(model, x, y)
    out = ncp.meta_step(
        model, (x, y), ncp.MetaConfig(inner_steps=2, pruner=ncp.ContextPruner(score="loss"))
    )
    assert out.kept_indices is not None and out.kept_indices.shape == (2, 3, 6)
    assert all(g.abs().sum() > 0 for g in _meta_grads(out.loss, model))


# --- 2b. networks written as fn(x, weights): FunctionalModel -----------------------------------


def field(x: Tensor, w: List[Tensor]) -> Tensor:
    return torch.tanh(x @ w[0] + w[1]) @ w[2] + w[3]


def _weights(seed: int = 0, hidden: int = 8) -> List[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, hidden), (hidden,), (hidden, 3), (3,)]
    return [nn.Parameter(0.5 * torch.randn(*s, generator=g, dtype=D)) for s in shapes]


def test_functional_model_calls_fn_with_its_weights_in_order():
    weights = _weights(8)
    model = FunctionalModel(field, weights, names=["w1", "b1", "w2", "b2"])
    x, _ = _data(8)
    assert_close(model(x[0]), field(x[0], weights))
    assert [n for n, _ in model.named_parameters()] == ["w1", "b1", "w2", "b2"]
    # nn.Parameters are registered as they are: an optimizer over `weights` keeps working
    assert all(p is w for p, w in zip(model.parameters(), weights, strict=True))
    assert model.weights() == list(weights)
    assert [n for n, _ in FunctionalModel(field, weights).named_parameters()] == [
        "0",
        "1",
        "2",
        "3",
    ]
    assert "names=['w1', 'b1', 'w2', 'b2']" in repr(model) and "fn=field" in repr(model)


def test_functional_model_wraps_plain_tensors_sharing_storage_and_keeps_requires_grad():
    a = torch.randn(2, 8, dtype=D, requires_grad=True)
    b = torch.zeros(8, dtype=D)  # requires_grad=False: a frozen weight
    model = FunctionalModel(lambda x, w: torch.tanh(x @ w[0] + w[1]), [a, b])
    p0, p1 = model.get_parameter("0"), model.get_parameter("1")
    assert isinstance(p0, nn.Parameter) and p0.data_ptr() == a.data_ptr()
    assert p0.requires_grad and not p1.requires_grad
    with torch.no_grad():
        p0.add_(1.0)  # an optimizer step on the model moves the user's tensor too
    assert torch.equal(a, p0)
    out = ncp.meta_step(model, _data(9, d_out=8), ncp.MetaConfig(inner_steps=1, pruner=None))
    assert set(out.params) == {"0"}  # the frozen weight is shared, not adapted


@pytest.mark.parametrize("vmap_tasks", [True, False])
@pytest.mark.parametrize("score", ["loss", "gradncp"])
def test_functional_model_meta_step_matches_an_unroll_of_fn(score, vmap_tasks):
    weights = _weights(10)
    model = FunctionalModel(field, weights)
    x, y = _data(10)
    boot = ncp.BootstrapMetaLoss(steps=2, lr=0.05, weight=2.0)
    cfg = ncp.MetaConfig(
        inner_steps=3,
        inner_lr=0.1,
        pruner=ncp.ContextPruner(ratio=0.5, score=score),
        bootstrap=boot,
        vmap_tasks=vmap_tasks,
    )
    out = ncp.meta_step(model, (x, y), cfg)
    theta0 = {str(i): w for i, w in enumerate(weights)}
    want = unroll(
        lambda xs, p: field(xs, [p[str(i)] for i in range(4)]),
        theta0,
        x,
        y,
        steps=3,
        lr=0.1,
        kept=out.kept_indices,
        boot=boot,
    )
    assert_close(out.loss, want)
    # the meta-gradient lands in the user's own weights
    _assert_all_close(torch.autograd.grad(out.loss, weights), torch.autograd.grad(want, weights))


def test_functional_model_gradncp_score_is_the_per_point_gradient_norm_of_all_weights():
    weights = _weights(11)
    model = FunctionalModel(field, weights)
    x, y = _data(11, tasks=2, points=10)
    scores = ncp.ContextPruner().scores(model, x, y)
    for i in range(2):
        for j in range(10):
            loss = F.mse_loss(field(x[i, j : j + 1], weights), y[i, j : j + 1])
            norm = torch.cat([g.flatten() for g in torch.autograd.grad(loss, weights)]).norm()
            assert_close(scores[i, j], norm)


def test_functional_model_errors_name_the_argument_and_the_fix():
    w = _weights(12)
    with pytest.raises(TypeError, match=r"`fn` must be callable as fn\(x, weights\), got int"):
        FunctionalModel(3, w)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`weights\[1\]` must be a tensor, got list"):
        FunctionalModel(field, [w[0], [1.0]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"got 2 names for 4 weights"):
        FunctionalModel(field, w, names=["a", "b"])
    with pytest.raises(ValueError, match=r"without '\.', got 'layer1.weight'"):
        FunctionalModel(field, w, names=["layer1.weight", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"non-empty strings without '\.', got ''"):
        FunctionalModel(field, w, names=["", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"must be unique, got \['a'\] more than once"):
        FunctionalModel(field, w, names=["a", "b", "a", "d"])
    for taken in ("forward", "weights", "fn", "training"):
        with pytest.raises(ValueError, match=rf"{taken!r} is already an attribute"):
            FunctionalModel(field, w, names=[taken, "b", "c", "d"])


# --- 3. adapting a subset: MetaConfig.adapt_only -------------------------------------------------


class ModulatedSiren(nn.Module):
    """A small SIREN whose hidden pre-activations are shifted by ``modulations`` (functa)."""

    def __init__(self, hidden: int = 8, depth: int = 2, w0: float = 3.0) -> None:
        super().__init__()
        self.body = nn.ModuleList(nn.Linear(2 if i == 0 else hidden, hidden) for i in range(depth))
        self.head = nn.Linear(hidden, 3)
        self.w0 = w0
        self.modulations = nn.Parameter(torch.zeros(depth * hidden))

    def forward(self, x: Tensor) -> Tensor:
        shifts = self.modulations.view(len(self.body), -1)
        for layer, shift in zip(self.body, shifts, strict=True):
            x = torch.sin(self.w0 * (layer(x) + shift))
        return self.head(x)


def _siren(seed: int = 0) -> ModulatedSiren:
    torch.manual_seed(seed)
    return ModulatedSiren().to(D)


SUBSETS = {
    "modulations": (("modulations",), ["modulations"]),
    "module prefix": (("head",), ["head.weight", "head.bias"]),
    "mixed": (("modulations", "body.1.bias"), ["body.1.bias", "modulations"]),
}


@pytest.mark.parametrize("subset", list(SUBSETS))
def test_adapt_only_changes_only_the_chosen_tensors_and_all_get_meta_gradients(subset):
    adapt_only, chosen = SUBSETS[subset]
    model, (x, y) = _siren(13), _data(13)
    cfg = ncp.MetaConfig(
        inner_steps=3, inner_lr=0.1, adapt_only=adapt_only, pruner=ncp.ContextPruner(ratio=0.5)
    )
    out = ncp.meta_step(model, (x, y), cfg)
    theta0 = _theta0(model)
    assert set(out.params) == set(theta0)
    for name, p in out.params.items():
        initial = theta0[name].detach().expand_as(p)
        if name in chosen:
            assert not torch.equal(p.detach(), initial), name
        else:
            assert torch.equal(p.detach(), initial), name
    assert out.bootstrap_target is not None and set(out.bootstrap_target) == set(chosen)
    # every parameter still receives a meta-gradient
    grads = dict(zip(theta0, _meta_grads(out.loss, model), strict=True))
    assert all(g.abs().sum() > 0 for g in grads.values()), [
        n for n, g in grads.items() if not g.any()
    ]


ADAPT_CASES = {
    "no pruning, no bootstrap": dict(ratio=None, boot=False, first_order=False),
    "ratio 1.0": dict(ratio=1.0, boot=False, first_order=False),
    "bootstrap over the subset": dict(ratio=None, boot=True, first_order=False),
    "ratio 0.5 and bootstrap": dict(ratio=0.5, boot=True, first_order=False),
    "first-order": dict(ratio=None, boot=True, first_order=True),
}


@pytest.mark.parametrize("subset", list(SUBSETS))
@pytest.mark.parametrize("case", list(ADAPT_CASES))
def test_adapt_only_meta_gradients_equal_an_unroll_adapting_only_the_subset(subset, case):
    adapt_only, chosen = SUBSETS[subset]
    opts = ADAPT_CASES[case]
    model, (x, y) = _siren(14), _data(14)
    boot = ncp.BootstrapMetaLoss(steps=2, lr=0.05, weight=2.0) if opts["boot"] else None
    pruner = ncp.ContextPruner(ratio=opts["ratio"]) if opts["ratio"] is not None else None
    cfg = ncp.MetaConfig(
        inner_steps=3,
        inner_lr=0.1,
        first_order=opts["first_order"],
        adapt_only=adapt_only,
        pruner=pruner,
        bootstrap=boot,
    )
    out = ncp.meta_step(model, (x, y), cfg)
    if opts["ratio"] == 1.0:
        assert out.kept_indices is not None and out.kept_indices.shape == (3, 3, 24)
    want = unroll(
        _module_forward(model),
        _theta0(model),
        x,
        y,
        steps=3,
        lr=0.1,
        adapt=chosen,
        kept=out.kept_indices if opts["ratio"] not in (None, 1.0) else None,
        boot=boot,
        first_order=opts["first_order"],
    )
    assert_close(out.loss, want)
    _assert_all_close(_meta_grads(out.loss, model), _meta_grads(want, model))


def test_adapt_only_bootstrap_term_differs_from_the_all_parameter_term():
    # The restriction is real: the same model adapted on everything gives another term.
    model, (x, y) = _siren(15), _data(15)
    boot = ncp.BootstrapMetaLoss(steps=2, weight=1.0)
    sub = ncp.meta_step(
        model,
        (x, y),
        ncp.MetaConfig(inner_steps=2, adapt_only=("modulations",), pruner=None, bootstrap=boot),
    )
    full = ncp.meta_step(model, (x, y), ncp.MetaConfig(inner_steps=2, pruner=None, bootstrap=boot))
    assert sub.bootstrap_loss is not None and full.bootstrap_loss is not None
    assert not torch.allclose(sub.bootstrap_loss, full.bootstrap_loss)
    theta_k = sub.params["modulations"]
    target = sub.bootstrap_target
    assert target is not None
    assert_close(sub.bootstrap_loss, (theta_k - target["modulations"]).norm(dim=1))


def test_adapt_only_module_prefix_matches_whole_names_only():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 4)
            self.lin2 = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin2(torch.tanh(self.lin(x)))

    torch.manual_seed(16)
    model, (x, y) = Two().to(D), _data(16)
    cfg = ncp.MetaConfig(inner_steps=2, adapt_only=("lin",), pruner=None, bootstrap=None)
    out = ncp.meta_step(model, (x, y), cfg)
    for name in ("lin2.weight", "lin2.bias"):
        assert torch.equal(out.params[name].detach()[0], model.get_parameter(name).detach())
    assert not torch.equal(out.params["lin.weight"].detach()[0], model.lin.weight.detach())
    with pytest.raises(ValueError, match=r"entries \['lin.w'\] match no trainable"):
        ncp.meta_step(model, (x, y), ncp.MetaConfig(adapt_only=("lin.w",), pruner=None))


def test_adapt_only_with_functional_model_names():
    weights = _weights(17)
    model = FunctionalModel(field, weights, names=["w1", "b1", "w2", "b2"])
    x, y = _data(17)
    cfg = ncp.MetaConfig(
        inner_steps=2, inner_lr=0.1, adapt_only=("b1", "b2"), pruner=None, bootstrap=None
    )
    out = ncp.meta_step(model, (x, y), cfg)
    theta0 = dict(zip(["w1", "b1", "w2", "b2"], weights, strict=True))
    want = unroll(
        lambda xs, p: field(xs, [p[n] for n in ["w1", "b1", "w2", "b2"]]),
        theta0,
        x,
        y,
        steps=2,
        lr=0.1,
        adapt=["b1", "b2"],
    )
    assert_close(out.loss, want)
    _assert_all_close(torch.autograd.grad(out.loss, weights), torch.autograd.grad(want, weights))


@pytest.mark.parametrize("rescale", [False, True])
def test_adapt_with_adapt_only_moves_only_the_subset(rescale):
    model, (x, y) = _siren(18), _data(18)
    cfg = ncp.MetaConfig(inner_lr=0.1, adapt_only=("modulations",), pruner=ncp.ContextPruner())
    result = ncp.adapt(model, x, y, cfg, steps=3, mode="rescaled" if rescale else "full")
    adapted = result.params
    for name, p in model.named_parameters():
        if name != "modulations":
            assert torch.equal(adapted[name], p.detach().expand_as(adapted[name])), name
    assert adapted["modulations"].shape == (3, 16)
    if rescale:
        assert result.kept_indices is not None
        return
    # plain full-context SGD on the modulations only, by hand
    for i in range(3):
        params = {n: p.detach() for n, p in model.named_parameters()}
        for _ in range(3):
            m = params["modulations"].requires_grad_(True)
            loss = F.mse_loss(functional_call(model, {**params, "modulations": m}, (x[i],)), y[i])
            (g,) = torch.autograd.grad(loss, m)
            params["modulations"] = (m - 0.1 * g).detach()
        assert_close(adapted["modulations"][i], params["modulations"])
    assert result.losses[0, 0] > result.losses[-1, 0]


def test_adapt_only_errors_name_the_entries_and_the_trainable_parameters():
    model, (x, y) = _siren(19), _data(19)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`MetaConfig.adapt_only` entries ['latents'] match no trainable parameter or module; "
            "trainable parameters are ['modulations', 'body.0.weight'"
        ),
    ):
        ncp.meta_step(model, (x, y), ncp.MetaConfig(adapt_only=("modulations", "latents")))
    with pytest.raises(ValueError, match=r"entries \['latents'\] match no trainable"):
        ncp.adapt(model, x, y, ncp.MetaConfig(adapt_only=("latents",)))
    # a frozen parameter is not adaptable: it is shared by all tasks
    model.modulations.requires_grad_(False)
    with pytest.raises(ValueError, match=r"entries \['modulations'\] match no trainable"):
        ncp.meta_step(model, (x, y), ncp.MetaConfig(adapt_only=("modulations",)))
    for bad in ("modulations", (), ("modulations", 1)):
        with pytest.raises(TypeError, match=r"`MetaConfig.adapt_only` must be a non-empty tuple"):
            ncp.MetaConfig(adapt_only=bad)  # type: ignore[arg-type]
    # a list is accepted and stored as a tuple (the config stays hashable)
    assert ncp.MetaConfig(adapt_only=["modulations"]).adapt_only == ("modulations",)


def test_adapt_only_parameter_unused_by_the_inner_loss_is_an_error():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(2, 3)
            self.latent = nn.Parameter(torch.zeros(4))  # forgotten in forward

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

    model, (x, y) = Unused().to(D), _data(20)
    with pytest.raises(ValueError, match=r"parameter 'latent' got no gradient from the inner loss"):
        ncp.meta_step(model, (x, y), ncp.MetaConfig(adapt_only=("latent",), pruner=None))


# --- the docs page's code -------------------------------------------------------------------------


def _page_batch(seed: int, tasks: int = 2, points: int = 64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(tasks, points, 2, generator=g), torch.rand(tasks, points, 3, generator=g)


def _page_mlp() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def _run(code: str, **ns) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        exec(code, ns)
    return ns


TOL = dict(rtol=1e-4, atol=1e-6)  # float32, as on the page


def _check_diff(blocks: Dict[str, str], prefix: str) -> tuple[str, str]:
    old, new = diff_sides(blocks[f"{prefix}-diff"])
    assert old == blocks[f"{prefix}-before"]
    assert "ncp." in new
    return old, new


def _grads_of(make: Callable[[], nn.Module], batch, cfg: ncp.MetaConfig) -> List[Tensor]:
    model = make()
    out = ncp.meta_step(model, batch, cfg)
    return list(torch.autograd.grad(out.loss, list(model.parameters())))


def _page_grads(code: str, **ns) -> tuple[dict, List[Tensor]]:
    """Run a page loop on one batch; the gradients it leaves before the optimizer step."""
    assert code.count("    opt.step()") == 1
    code = code.replace(
        "    opt.step()", "    grads = [p.grad.clone() for p in opt.param_groups[0]['params']]"
    )
    ns = _run(code, **ns)
    return ns, ns["grads"]


def test_docs_learn2learn_diff_gives_meta_step_gradients(monkeypatch):
    monkeypatch.setitem(sys.modules, "learn2learn", _standin_l2l())
    blocks = named_blocks("interop.md")
    old, new = _check_diff(blocks, "modules-l2l")
    x, y = _page_batch(1)

    _, before = _page_grads(old, make_model=_page_mlp, loader=[(x, y)])
    maml = ncp.MetaConfig(inner_steps=4, inner_lr=1e-2, pruner=None, bootstrap=None)
    for g, w in zip(before, _grads_of(_page_mlp, (x, y), maml), strict=True):
        assert_close(g, w, **TOL)

    ns, after = _page_grads(new, make_model=_page_mlp, loader=[(x, y)])
    cfg = ncp.MetaConfig(
        inner_steps=16, inner_lr=1e-2, pruner=ns["pruner"], bootstrap=ns["bootstrap"]
    )
    for g, w in zip(after, _grads_of(_page_mlp, (x, y), cfg), strict=True):
        assert_close(g, w, **TOL)
    assert _no_hooks(ns["model"])


def _page_meta_mlp() -> nn.Module:
    return _meta_mlp(0).float()


def test_docs_torchmeta_diff_gives_meta_step_gradients():
    blocks = named_blocks("interop.md")
    old, new = _check_diff(blocks, "modules-torchmeta")
    x, y = _page_batch(2)
    _, before = _page_grads(old, make_model=_page_meta_mlp, loader=[(x, y)])
    maml = ncp.MetaConfig(inner_steps=4, inner_lr=1e-2, pruner=None, bootstrap=None)
    for g, w in zip(before, _grads_of(_page_meta_mlp, (x, y), maml), strict=True):
        assert_close(g, w, **TOL)
    ns, after = _page_grads(new, make_model=_page_meta_mlp, loader=[(x, y)])
    for g, w in zip(after, _grads_of(_page_meta_mlp, (x, y), ns["cfg"]), strict=True):
        assert_close(g, w, **TOL)


def test_docs_weights_diff_gives_meta_step_gradients_in_the_users_weights():
    blocks = named_blocks("interop.md")
    old, new = _check_diff(blocks, "modules-weights")
    x, y = _page_batch(3)
    ns_old, before = _page_grads(old, loader=[(x, y)])
    ns_new, after = _page_grads(new, loader=[(x, y)])
    model = ns_new["model"]
    assert all(p is w for p, w in zip(model.parameters(), ns_new["weights"], strict=True))

    _assert_all_close(ns_new["weights"], ns_old["weights"])  # both drawn from one seed

    def fresh() -> nn.Module:  # the page's initial weights (its optimizer step was left out)
        return FunctionalModel(
            ns_old["field"], [nn.Parameter(w.detach().clone()) for w in ns_old["weights"]]
        )

    maml = ncp.MetaConfig(inner_steps=4, inner_lr=1e-2, pruner=None, bootstrap=None)
    for g, w in zip(before, _grads_of(fresh, (x, y), maml), strict=True):
        assert_close(g, w, **TOL)
    for g, w in zip(after, _grads_of(fresh, (x, y), ns_new["cfg"]), strict=True):
        assert_close(g, w, **TOL)


def test_docs_modulations_diff_gives_meta_step_gradients_and_adapts_the_modulations():
    blocks = named_blocks("interop.md")
    old, new = _check_diff(blocks, "modules-modulations")
    classes = _run(blocks["modules-modulations-model"])
    x, y = _page_batch(4)

    def fresh() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return classes["ModulatedSiren"]()

    _, before = _page_grads(old, loader=[(x, y)], **classes)
    maml = ncp.MetaConfig(
        inner_steps=3, inner_lr=1e-2, adapt_only=("modulations",), pruner=None, bootstrap=None
    )
    for g, w in zip(before, _grads_of(fresh, (x, y), maml), strict=True):
        assert_close(g, w, **TOL)
    ns, after = _page_grads(new, loader=[(x, y)], **classes)
    assert ns["cfg"].adapt_only == ("modulations",)
    for g, w in zip(after, _grads_of(fresh, (x, y), ns["cfg"]), strict=True):
        assert_close(g, w, **TOL)

    x_test, y_test = _page_batch(5, tasks=3)
    ns.update(x_test=x_test, y_test=y_test)
    exec(blocks["modules-modulations-test-time"], ns)
    assert ns["latents"].shape == (3, 3 * 64)
    assert ns["pred"].shape == (3, 64, 3)
    for name, p in ns["model"].named_parameters():
        if name != "modulations":
            assert torch.equal(ns["adapted"][name], p.detach().expand_as(ns["adapted"][name]))


def test_every_public_name_is_on_the_api_page():
    api = (DOCS / "api.rst").read_text()
    for name in interop_modules.__all__:
        assert f"ncp.interop.modules.{name}\n" in api, name
    assert "interop\n" in (DOCS / "index.md").read_text()
