"""ncp.GraphedMetaStep and MetaConfig(check_finite=False): the step recorded as a CUDA graph.

What can be checked without a GPU is checked here: the eager path has the recorded step's
gradient semantics, and the step does nothing that reads device values back to the host (it
runs on the meta device, whose tensors have no values). The recording itself is tested in
tests/test_cuda.py-style below, skipped without CUDA.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

import ncp
from ncp._graphs import _check_capturable
from tests import _models

CFG = ncp.MetaConfig(
    inner_steps=3,
    pruner=ncp.ContextPruner(ratio=0.25),
    bootstrap=ncp.BootstrapMetaLoss(steps=2),
)


def _batch(seed, tasks=3, points=80, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, points, 2, generator=g)
    return x.to(device), torch.rand(tasks, points, 3, generator=g).to(device)


def _reference(model, batch, cfg):
    model.zero_grad(set_to_none=True)
    out = ncp.meta_step(model, batch, cfg)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


@pytest.mark.parametrize("four", [False, True])
def test_eager_step_writes_each_batchs_meta_gradient(four):
    torch.manual_seed(0)
    model = _models.SigmoidHead(2, 3)
    b1, b2 = _batch(1), _batch(2)
    if four:  # a disjoint query set: (context_x, context_y, query_x, query_y)
        q = _batch(3, points=40)
        b1, b2 = (*b1, *q), (*b2, *q)
    loss2, grads2 = _reference(model, b2, CFG)
    step = ncp.GraphedMetaStep(model, b1, CFG, capture=False)
    step(b1)
    out = step(b2)  # written, not added to the first batch's gradient
    assert_close(out.loss.detach(), loss2)
    for p, g in zip(model.parameters(), grads2, strict=True):
        assert_close(p.grad, g)
    model.zero_grad(set_to_none=True)  # what an optimizer loop may do between calls
    step(b2)
    for p, g in zip(model.parameters(), grads2, strict=True):
        assert_close(p.grad, g)


def test_learned_rates_get_their_gradient_too():
    torch.manual_seed(0)
    model = _models.SigmoidHead(2, 3)
    rates = ncp.LearnedLR(model, CFG.inner_steps, init=0.05)
    batch = _batch(4)
    step = ncp.GraphedMetaStep(model, batch, CFG, learned_lr=rates, capture=False)
    step(batch)
    got = [p.grad.clone() for p in rates.parameters()]
    model.zero_grad(set_to_none=True)
    rates.zero_grad(set_to_none=True)
    ncp.meta_step(model, batch, CFG, learned_lr=rates).loss.backward()
    for g, p in zip(got, rates.parameters(), strict=True):
        assert_close(g, p.grad)


def test_meta_step_reads_nothing_back_from_the_device_without_the_finite_check():
    # Meta tensors have shapes but no values: any .item(), bool(tensor) or data-dependent shape
    # in the step fails there. That is what a CUDA graph cannot record.
    model = _models.SigmoidHead(2, 3).to("meta")
    batch = tuple(t.to("meta") for t in _batch(5))
    cfg = dataclasses.replace(CFG, check_finite=False, chunk_size=32)
    out = ncp.meta_step(model, batch, cfg)
    out.loss.backward()
    assert out.loss.device.type == "meta" and out.kept_indices.shape == (3, 3, 20)
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    with pytest.raises((NotImplementedError, RuntimeError)):  # the default check reads back
        ncp.meta_step(model, batch, CFG)


def test_check_finite_off_skips_the_check_and_the_step_checks_after_each_call():
    torch.manual_seed(0)
    model = _models.SigmoidHead(2, 3)
    x, y = _batch(6)
    y[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite inner loss"):
        ncp.meta_step(model, (x, y), CFG)
    out = ncp.meta_step(model, (x, y), dataclasses.replace(CFG, check_finite=False))
    assert torch.isnan(out.inner_losses[0, 0])
    step = ncp.GraphedMetaStep(model, (x, y), CFG, capture=False)
    with pytest.raises(FloatingPointError, match="step 0 of task 0"):
        step((x, y))
    quiet = ncp.GraphedMetaStep(
        model, (x, y), dataclasses.replace(CFG, check_finite=False), capture=False
    )
    assert torch.isnan(quiet((x, y)).inner_losses[0, 0])
    with pytest.raises(TypeError, match="check_finite"):
        ncp.MetaConfig(check_finite=1)


def test_bad_batches_and_settings_name_the_fix():
    model = _models.SigmoidHead(2, 3)
    step = ncp.GraphedMetaStep(model, _batch(0), CFG, capture=False)
    with pytest.raises(ValueError, match=r"`batch\[0\]` must be \(3, 80, 2\).*got \(3, 60, 2\)"):
        step(_batch(0, points=60))
    with pytest.raises(ValueError, match="must have 2 tensors"):
        step((*_batch(0), *_batch(1)))
    with pytest.raises(ValueError, match="capture=False"):
        ncp.GraphedMetaStep(model, _batch(0), CFG, capture=True)
    with pytest.raises(ValueError, match="`warmup` must be an int >= 1, got 0"):
        ncp.GraphedMetaStep(model, _batch(0), CFG, warmup=0)
    cuda = torch.device("cuda")  # the checks themselves need no GPU
    with pytest.raises(ValueError, match="recompute_steps"):
        _check_capturable(cuda, dataclasses.replace(CFG, recompute_steps=True))
    seeded = ncp.ContextPruner(score="random", generator=torch.Generator())
    with pytest.raises(ValueError, match="generator"):
        _check_capturable(cuda, dataclasses.replace(CFG, pruner=seeded))


@pytest.mark.cuda
def test_recorded_step_on_cuda_equals_the_eager_step():
    torch.manual_seed(0)
    model = _models.SigmoidHead(2, 3).cuda()
    b1, b2 = _batch(1, device="cuda"), _batch(2, device="cuda")
    loss2, grads2 = _reference(model, b2, CFG)
    step = ncp.GraphedMetaStep(model, b1, CFG)
    assert step.capture
    step(b1)
    out = step(b2)
    assert_close(out.loss.detach(), loss2, rtol=1e-4, atol=1e-6)
    for p, g in zip(model.parameters(), grads2, strict=True):
        assert_close(p.grad, g, rtol=1e-3, atol=1e-6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # in-place updates are seen by replay
    opt.step()
    loss3, _ = _reference(model, b1, CFG)
    assert_close(step(b1).loss.detach(), loss3, rtol=1e-4, atol=1e-6)
