"""CUDA checks: skipped without a GPU (run them with `pytest -m cuda` on a GPU machine)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

import ncp
from tests import _models

pytestmark = pytest.mark.cuda


def _data(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, 2, generator=g)
    y = torch.rand(3, 32, 3, generator=g)
    return x.to(device), y.to(device)


def test_meta_step_on_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu = _models.SigmoidHead(2, 3)
    gpu = _models.SigmoidHead(2, 3).cuda()
    gpu.load_state_dict(cpu.state_dict())
    cfg = ncp.MetaConfig(inner_steps=3, pruner=ncp.ContextPruner(ratio=0.5))
    a = ncp.meta_step(cpu, _data("cpu"), cfg)
    b = ncp.meta_step(gpu, _data("cuda"), cfg)
    assert b.loss.device.type == "cuda"
    assert_close(b.loss.cpu(), a.loss, rtol=1e-4, atol=1e-5)
    ga = torch.autograd.grad(a.loss, list(cpu.parameters()))
    gb = torch.autograd.grad(b.loss, list(gpu.parameters()))
    for u, v in zip(ga, gb, strict=True):
        assert_close(v.cpu(), u, rtol=1e-3, atol=1e-5)


def test_adapt_and_random_scores_on_cuda():
    torch.manual_seed(0)
    model = _models.mlp(2, 3).cuda()
    x, y = _data("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    cfg = ncp.MetaConfig(pruner=ncp.ContextPruner(score="random", generator=gen))
    params = ncp.adapt(model, x, y, cfg, steps=2, mode="rescaled").params
    assert ncp.forward(model, params, x).device.type == "cuda"


def test_memory_meter_reads_cuda_peak():
    torch.manual_seed(0)
    model = _models.mlp(2, 3).cuda()
    x, y = _data("cuda")
    with ncp.MemoryMeter("cuda") as meter:
        ncp.meta_step(model, (x, y), ncp.MetaConfig(inner_steps=2)).loss.backward()
    assert meter.peak_cuda_bytes is not None and meter.peak_cuda_bytes > 0
    assert meter.peak_saved_bytes > 0


def test_vectorised_gradncp_scores_on_cuda_equal_the_task_loop():
    torch.manual_seed(0)
    model = _models.SigmoidHead(2, 3).cuda()
    x, y = _data("cuda")
    params = ncp.functional.init_params(model, x.shape[0], detach=True)
    head = ncp.functional.find_head(model, {k: v[0] for k, v in params.items()}, x[0, :8])
    loop = ncp.functional.score_points(
        model, params, x, y, loss_fn=ncp.losses.mse, head=head, strategy="loop"
    )
    # on CUDA score_points takes the vectorised path
    got = ncp.functional.score_points(model, params, x, y, loss_fn=ncp.losses.mse, head=head)
    assert got.device.type == "cuda"
    assert_close(got, loop, rtol=1e-4, atol=1e-6)


def test_recomputed_steps_on_cuda_match_and_hold_less():
    torch.manual_seed(0)
    model = _models.mlp(2, 3, hidden=64).cuda()
    x, y = (t.repeat(1, 16, 1) for t in _data("cuda"))
    base = ncp.MetaConfig(inner_steps=6, pruner=ncp.ContextPruner(ratio=0.5))
    plain = ncp.meta_step(model, (x, y), base)
    with ncp.MemoryMeter("cuda") as meter:
        again = ncp.meta_step(model, (x, y), dataclasses.replace(base, recompute_steps=True))
    params = list(model.parameters())
    for u, v in zip(
        torch.autograd.grad(plain.loss, params),
        torch.autograd.grad(again.loss, params),
        strict=True,
    ):
        assert_close(v, u, rtol=1e-4, atol=1e-6)
    assert meter.peak_cuda_bytes is not None and meter.peak_cuda_bytes > 0
