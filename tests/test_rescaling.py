"""GradRescaler: the pruned gradient's norm with the full gradient's direction."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

import ncp
from ncp.functional import per_task_norm


@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_norm_of_pruned_direction_of_full(tasks, width, seed):
    g = torch.Generator().manual_seed(seed)
    full = {
        "a": torch.randn(tasks, width, generator=g, dtype=torch.float64),
        "b": torch.randn(tasks, 2, 3, generator=g, dtype=torch.float64),
    }
    pruned = {
        k: 5 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in full.items()
    }
    out = ncp.GradRescaler()(full, pruned_grads=pruned)
    assert_close(per_task_norm(out), per_task_norm(pruned))
    for k in full:
        flat_out, flat_full = out[k].flatten(1), full[k].flatten(1)
        # same direction: a positive multiple, the same one for every parameter of a task
        ratio = per_task_norm(pruned) / per_task_norm(full)
        assert_close(flat_out, flat_full * ratio.unsqueeze(1))


def test_zero_full_gradient_gives_zero_step():
    full = {"a": torch.zeros(2, 3)}
    pruned = {"a": torch.ones(2, 3)}
    out = ncp.GradRescaler()(full, pruned_grads=pruned)
    assert torch.equal(out["a"], torch.zeros(2, 3))
    full = {"a": torch.tensor([[0.0, 0.0], [3.0, 4.0]])}
    out = ncp.GradRescaler()(full, pruned_grads={"a": torch.tensor([[1.0, 0.0], [0.0, 10.0]])})
    assert_close(out["a"], torch.tensor([[0.0, 0.0], [6.0, 8.0]]))


def test_loss_mode_uses_loss_ratio():
    full = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    out = ncp.GradRescaler(mode="loss")(
        full, full_loss=torch.tensor([2.0, 0.0]), pruned_loss=torch.tensor([6.0, 1.0])
    )
    assert_close(out["a"], torch.tensor([[3.0, 6.0], [0.0, 0.0]]))


def test_missing_inputs_and_bad_mode():
    with pytest.raises(ValueError, match="needs `full_grads` and `pruned_grads`"):
        ncp.GradRescaler()({"a": torch.ones(1, 2)})
    with pytest.raises(ValueError, match="needs `full_loss` and `pruned_loss`"):
        ncp.GradRescaler(mode="loss")({"a": torch.ones(1, 2)})
    with pytest.raises(
        ValueError, match=r"`GradRescaler.mode` must be one of \['grad', 'loss'\], got 'norm'"
    ):
        ncp.GradRescaler(mode="norm")  # type: ignore[arg-type]
