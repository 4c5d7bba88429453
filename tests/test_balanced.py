"""Class-balanced pruning: ``ContextPruner(balance_classes=N)`` and
``ncp.functional.balanced_top_k_indices``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

import ncp
from ncp.functional import balanced_top_k_indices, keep_count, top_k_indices
from tests import _models, _reference

F64 = dict(rtol=1e-6, atol=1e-8)


def per_class(indices: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Kept points per class, ``(tasks, classes)``."""
    return torch.stack(
        [torch.bincount(labels[t, indices[t]], minlength=classes) for t in range(len(indices))]
    )


def classification(tasks=2, ways=3, shots=8, d_in=2, seed=0, dtype=torch.float64):
    """Inputs and shuffled labels with ``shots`` points per class in every task."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, ways * shots, d_in, generator=g, dtype=dtype)
    labels = torch.arange(ways).repeat_interleave(shots)
    y = torch.stack([labels[torch.randperm(ways * shots, generator=g)] for _ in range(tasks)])
    return x, y


@given(
    tasks=st.integers(1, 3),
    classes=st.integers(2, 6),
    points=st.integers(2, 60),
    ratio=st.floats(0.02, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_balanced_selection_matches_the_loop_reference(tasks, classes, points, ratio, seed):
    k = keep_count(ratio, points)
    if k == 0:
        return
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (tasks, points), generator=g)  # unequal, some absent
    scores = torch.randn(tasks, points, generator=g).round(decimals=1)  # with ties
    idx = balanced_top_k_indices(scores, labels, k, classes)
    assert idx.shape == (tasks, k)
    counts = per_class(idx, labels, classes)
    available = torch.stack([torch.bincount(labels[t], minlength=classes) for t in range(tasks)])
    share = available * k / points
    assert (counts.sum(1) == k).all()
    assert (counts >= share.floor()).all() and (counts <= share.ceil()).all()
    assert (counts <= available).all()
    for t in range(tasks):
        assert len(set(idx[t].tolist())) == k
        want = _reference.balanced_top(scores[t], labels[t], k, classes)
        assert idx[t].sort().values.tolist() == want.tolist()


def test_global_top_k_drops_a_class_that_balanced_selection_keeps():
    """The failure the option exists for: one class scoring low everywhere."""
    labels = torch.arange(4).repeat_interleave(10).unsqueeze(0)  # 4 classes x 10 points
    scores = torch.rand(1, 40, generator=torch.Generator().manual_seed(0)) + 1.0
    scores[labels == 3] -= 1.0  # class 3 scores below all the others
    global_counts = per_class(top_k_indices(scores, 12), labels, 4)
    balanced = per_class(balanced_top_k_indices(scores, labels, 12, 4), labels, 4)
    assert global_counts[0, 3] == 0
    assert balanced.tolist() == [[3, 3, 3, 3]]


def test_leftover_slots_go_to_the_best_remaining_points():
    # 3 classes x 4 points, k = 5: shares floor(5/3) = 1 each, 2 leftover slots.
    labels = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]])
    scores = torch.tensor([[9.0, 8.0, 0.0, 0.0, 7.0, 1.0, 0.0, 0.0, 6.0, 5.0, 0.0, 0.0]])
    kept = balanced_top_k_indices(scores, labels, 5, 3)[0].sort().values
    # Each class's best point, then the best remaining ones (8.0 of class 0, 5.0 of class 2),
    # at most one extra per class.
    assert kept.tolist() == [0, 1, 4, 8, 9]


def test_pruner_keeps_every_class_in_meta_step_and_adapt():
    torch.manual_seed(0)
    model = _models.mlp(d_out=5)
    x, y = classification(tasks=3, ways=5, shots=20, dtype=torch.float32)
    pruner = ncp.ContextPruner(ratio=0.25, balance_classes=5)
    cfg = ncp.MetaConfig(inner_steps=3, inner_lr=0.1, pruner=pruner)
    out = ncp.meta_step(model, (x, y), cfg, loss_fn=ncp.losses.cross_entropy)
    for step in range(3):
        assert per_class(out.kept_indices[step], y, 5).eq(5).all()
    for mode in ("pruned", "rescaled"):
        adapted = ncp.adapt(model, x, y, cfg, steps=2, loss_fn=ncp.losses.cross_entropy, mode=mode)
        for step in range(2):
            assert per_class(adapted.kept_indices[step], y, 5).eq(5).all()


def test_balanced_meta_step_matches_the_reference_unroll():
    torch.manual_seed(0)
    model = _models.mlp(d_out=3).double()
    x, y = classification(tasks=2, ways=3, shots=7)
    qx, qy = classification(tasks=2, ways=3, shots=3, seed=1)
    cfg = ncp.MetaConfig(
        inner_steps=3,
        inner_lr=0.5,
        pruner=ncp.ContextPruner(ratio=0.3, balance_classes=3),
        bootstrap=ncp.BootstrapMetaLoss(steps=2, lr=0.1, weight=3.0),
    )
    out = ncp.meta_step(model, (x, y, qx, qy), cfg, loss_fn=ncp.losses.cross_entropy)
    ref = _reference.meta_step(
        model,
        x,
        y,
        qx,
        qy,
        loss_fn=ncp.losses.cross_entropy,
        steps=3,
        lr=0.5,
        ratio=0.3,
        head_names=["4.weight", "4.bias"],
        boot_steps=2,
        boot_lr=0.1,
        weight=3.0,
        balance_classes=3,
    )
    for t in range(2):
        for k in range(3):
            assert out.kept_indices[k, t].sort().values.tolist() == ref["kept"][t][k].tolist()
    assert_close(out.loss, ref["loss"], **F64)
    params = list(model.parameters())
    got = torch.autograd.grad(out.loss, params, retain_graph=True)
    want = torch.autograd.grad(ref["loss"], params)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, **F64)


def test_chunked_scoring_keeps_the_same_points():
    torch.manual_seed(0)
    model = _models.mlp(d_out=4).double()
    x, y = classification(tasks=2, ways=4, shots=9)
    whole = ncp.ContextPruner(ratio=0.5, balance_classes=4)
    chunked = ncp.ContextPruner(ratio=0.5, balance_classes=4, chunk_size=5)
    a = whole(model, x, y, loss_fn=ncp.losses.cross_entropy)
    b = chunked(model, x, y, loss_fn=ncp.losses.cross_entropy)
    assert torch.equal(a.indices.sort(1).values, b.indices.sort(1).values)


def test_higher_adapter_keeps_the_same_points():
    higher = pytest.importorskip("higher")
    from ncp.interop.higher import prune

    torch.manual_seed(0)
    model = _models.mlp(d_out=3).double()
    x, y = classification(tasks=1, ways=3, shots=10)
    pruner = ncp.ContextPruner(ratio=0.4, balance_classes=3)
    want = pruner(model, x, y, loss_fn=ncp.losses.cross_entropy).indices[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, _):
        kept = prune(model, fmodel, x[0], y[0], pruner, loss_fn=ncp.losses.cross_entropy)
    assert torch.equal(kept.indices.sort().values, want.sort().values)
    assert torch.bincount(kept.y, minlength=3).tolist() == [4, 4, 4]


@pytest.mark.parametrize("value", [1, 0, True, 2.5, "5"])
def test_balance_classes_must_be_a_class_count(value):
    with pytest.raises(ValueError, match=r"`ContextPruner.balance_classes` must be the number"):
        ncp.ContextPruner(balance_classes=value)


def test_float_targets_are_refused_with_the_fix():
    model = _models.mlp()
    x, y = torch.rand(2, 16, 2), torch.rand(2, 16, 1)
    cfg = ncp.MetaConfig(inner_steps=1, pruner=ncp.ContextPruner(balance_classes=3))
    with pytest.raises(ValueError, match=r"needs integer class labels .* use balance_classes=None"):
        ncp.meta_step(model, (x, y), cfg)


@pytest.mark.parametrize("bad", [-1, 3])
def test_labels_out_of_range_are_refused(bad):
    model = _models.mlp(d_out=3)
    x, y = classification(tasks=2, ways=3, shots=4, dtype=torch.float32)
    y[1, 2] = bad
    pruner = ncp.ContextPruner(ratio=0.5, balance_classes=3)
    with pytest.raises(ValueError, match=r"labels in \[0, 3\), got labels from"):
        pruner(model, x, y, loss_fn=ncp.losses.cross_entropy)


def test_too_few_kept_points_for_the_classes_warns():
    model = _models.mlp(d_out=5)
    x, y = classification(tasks=1, ways=5, shots=4, dtype=torch.float32)
    pruner = ncp.ContextPruner(ratio=0.15, balance_classes=5)  # keeps 3 of 20 points
    with pytest.warns(UserWarning, match=r"keeps 3 points per step but the context holds 5"):
        pruner(model, x, y, loss_fn=ncp.losses.cross_entropy)


def test_bootstrap_chunk_size_gives_the_unchunked_target_and_takes_precedence():
    torch.manual_seed(0)
    model = _models.mlp().double()
    x = torch.rand(2, 30, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.sin(3 * x[..., :1])
    params = ncp.functional.init_params(model, 2, detach=True)
    plain = ncp.BootstrapMetaLoss(steps=3).target(model, params, x, y)
    chunked = ncp.BootstrapMetaLoss(steps=3, chunk_size=7)
    own = chunked.target(model, params, x, y)
    over = chunked.target(model, params, x, y, chunk_size=1000)  # cfg.chunk_size: overridden
    for name in plain:
        assert_close(own[name], plain[name], **F64)
        assert_close(over[name], plain[name], **F64)
    with pytest.raises(ValueError, match=r"`BootstrapMetaLoss.chunk_size` must be a positive"):
        ncp.BootstrapMetaLoss(chunk_size=0)


def test_bootstrap_chunk_size_bounds_the_transient_graph():
    torch.manual_seed(0)
    model = _models.mlp(hidden=64)
    x, y = torch.rand(1, 2048, 2), torch.rand(1, 2048, 1)
    params = ncp.functional.init_params(model, 1, detach=True)
    peaks = {}
    for chunk in (None, 128):
        with ncp.MemoryMeter() as meter:
            ncp.BootstrapMetaLoss(steps=1, chunk_size=chunk).target(model, params, x, y)
        peaks[chunk] = meter.peak_saved_bytes
    assert peaks[128] * 8 < peaks[None]


def test_plain_adapt_ignores_the_pruner_of_the_config():
    """Full-context adaptation never prunes, so a context the pruner could not prune (k = 0)
    or labels it could not balance are no reason to refuse it."""
    model = _models.mlp()
    x, y = torch.rand(2, 3, 2), torch.rand(2, 3, 1)
    cfg = ncp.MetaConfig(pruner=ncp.ContextPruner(ratio=0.25, balance_classes=3))
    adapted = ncp.adapt(model, x, y, cfg, steps=2)
    assert adapted.kept_indices is None and adapted.losses.shape == (2, 2)
