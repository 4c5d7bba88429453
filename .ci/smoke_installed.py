"""Smoke test of an installed ncp (wheel or sdist) in an environment with only torch.

Run from outside the repository so that the installed copy is imported, not the source tree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import ncp

repo = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else None
where = Path(ncp.__file__).resolve()
assert repo is None or where.parent != repo / "ncp", f"imported the source tree: {where}"
assert (where.parent / "py.typed").is_file(), "py.typed is missing from the installed package"

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
x, y = torch.rand(2, 256, 2), torch.rand(2, 256, 3)
cfg = ncp.MetaConfig(inner_steps=4, pruner=ncp.ContextPruner(ratio=0.25))
out = ncp.meta_step(model, (x, y), cfg)
out.loss.backward()
assert all(p.grad is not None for p in model.parameters())
assert out.kept_indices.shape == (4, 2, 64)
adapted = ncp.adapt(model, x, y, cfg, steps=4, mode="rescaled")
pred = ncp.forward(model, adapted.params, x)
assert pred.shape == y.shape
print(f"installed ncp {ncp.__version__} from {where.parent}: quickstart smoke test passed")
