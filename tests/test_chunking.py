"""MetaConfig.chunk_size: same numbers, less memory for full-context passes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

import ncp
from tests import _models

F64 = dict(rtol=1e-9, atol=1e-12)


def data(points=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, points, 2, generator=g, dtype=torch.float64)
    y = torch.rand(3, points, 1, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("chunk", [1, 7, 29])
@pytest.mark.parametrize("first_order", [False, True])
def test_chunked_meta_step_equals_unchunked(chunk, first_order):
    torch.manual_seed(0)
    model = _models.mlp().double()
    x, y = data()
    cfg = ncp.MetaConfig(
        inner_steps=3,
        inner_lr=0.3,
        first_order=first_order,
        pruner=ncp.ContextPruner(ratio=0.5),
        bootstrap=ncp.BootstrapMetaLoss(steps=2, lr=0.1, weight=2.0),
    )
    a = ncp.meta_step(model, (x, y), cfg)
    b = ncp.meta_step(model, (x, y), dataclasses.replace(cfg, chunk_size=chunk))
    assert torch.equal(a.kept_indices, b.kept_indices)
    assert_close(b.loss, a.loss, **F64)
    assert_close(b.bootstrap_loss, a.bootstrap_loss, **F64)
    params = list(model.parameters())
    for u, v in zip(
        torch.autograd.grad(a.loss, params), torch.autograd.grad(b.loss, params), strict=True
    ):
        assert_close(v, u, **F64)


@pytest.mark.parametrize("mode", ["grad", "loss"])
def test_chunked_adapt_equals_unchunked(mode):
    torch.manual_seed(0)
    model = _models.mlp().double()
    x, y = data()
    cfg = ncp.MetaConfig(pruner=ncp.ContextPruner(ratio=0.25))
    a = ncp.adapt(model, x, y, cfg, steps=3, mode=ncp.GradRescaler(mode=mode))
    b = ncp.adapt(
        model,
        x,
        y,
        dataclasses.replace(cfg, chunk_size=4),
        steps=3,
        mode=ncp.GradRescaler(mode=mode),
    )
    for k in a.params:
        assert_close(b.params[k], a.params[k], **F64)
    assert_close(b.losses, a.losses, **F64)


def test_chunking_bounds_the_query_pass_memory():
    """With few kept points, the full-context query pass dominates the saved bytes; checkpointed
    chunks keep only their inputs."""
    torch.manual_seed(0)
    model = _models.siren(hidden=64, layers=4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4096, 2, generator=g) * 2 - 1
    y = torch.rand(2, 4096, 3, generator=g)
    cfg = ncp.MetaConfig(inner_steps=2, pruner=ncp.ContextPruner(ratio=0.05))
    peaks = {}
    for chunk in (None, 512):
        with ncp.MemoryMeter() as meter:
            out = ncp.meta_step(model, (x, y), dataclasses.replace(cfg, chunk_size=chunk))
            out.loss.backward()
        peaks[chunk] = meter.peak_saved_bytes
    assert peaks[512] < 0.5 * peaks[None]


def test_chunk_size_validation():
    with pytest.raises(
        ValueError, match=r"`MetaConfig.chunk_size` must be a positive int or None, got 0"
    ):
        ncp.MetaConfig(chunk_size=0)


def test_first_order_chunks_interleave_the_points():
    """A label-sorted context: every chunk of a chunked gradient holds every class."""
    from ncp._params import interleaved_slices

    labels = torch.arange(5).repeat_interleave(100)  # sorted, 5 classes x 100
    slices = interleaved_slices(500, 62)
    assert len(slices) == 9 and sum(len(range(500)[sl]) for sl in slices) == 500
    assert sorted(i for sl in slices for i in range(500)[sl]) == list(range(500))
    assert all(len(range(500)[sl]) <= 62 for sl in slices)
    assert all(set(labels[sl].tolist()) == set(range(5)) for sl in slices)
