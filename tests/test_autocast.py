"""Mixed precision: meta_step under torch.autocast stays finite and close to float32.

Stated tolerance: under bf16 autocast (8-bit mantissa) the outer loss agrees with float32 to a
relative 1e-2 and the meta-gradient to a relative 10 % (cosine similarity > 0.99); scores,
norms and the bootstrap distance are computed in float32.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import ncp
from tests import _models


def setup(device="cpu"):
    torch.manual_seed(0)
    model = _models.siren(hidden=64, layers=4).to(device)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 256, 2, generator=g) * 2 - 1).to(device)
    y = torch.rand(2, 256, 3, generator=g).to(device)
    return model, x, y


def flat(grads):
    return torch.cat([g.flatten().float() for g in grads])


def compare(device, dtype):
    model, x, y = setup(device)
    cfg = ncp.MetaConfig(inner_steps=4)
    full = ncp.meta_step(model, (x, y), cfg)
    with torch.autocast(device, dtype=dtype):
        mixed = ncp.meta_step(model, (x, y), cfg)
        scores = ncp.ContextPruner().scores(model, x, y)
    assert scores.dtype == torch.float32
    assert mixed.bootstrap_loss is not None and mixed.bootstrap_loss.dtype == torch.float32
    assert torch.isfinite(mixed.loss) and torch.isfinite(mixed.inner_losses).all()
    assert_close(mixed.loss.float(), full.loss, rtol=1e-2, atol=0)
    params = list(model.parameters())
    a = flat(torch.autograd.grad(full.loss, params))
    b = flat(torch.autograd.grad(mixed.loss, params))
    assert torch.isfinite(b).all()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert (a - b).norm() / a.norm() < 0.1


def test_bf16_autocast_on_cpu():
    compare("cpu", torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cuda(dtype):
    compare("cuda", dtype)


def test_adapt_under_autocast():
    model, x, y = setup()
    cfg = ncp.MetaConfig()
    ref = ncp.adapt(model, x, y, cfg, steps=4, mode="rescaled").params
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ncp.adapt(model, x, y, cfg, steps=4, mode="rescaled").params
    assert all(v.dtype == torch.float32 for v in got.values())
    for k in ref:
        assert_close(got[k], ref[k], rtol=0.05, atol=2e-3)
