"""``MemoryMeter`` on graphs whose saved bytes are countable by hand, and the issue's memory
acceptance bounds for GradNCP against MAML on SIREN.

Sizes are float32 throughout: a saved ``(3, 5)`` tensor is ``15 * 4 = 60`` bytes.
"""

from __future__ import annotations

import functools
import gc
import math
from typing import Iterator

import pytest
import torch

import ncp
from tests import _models

F32 = 4  # bytes per float32 element


# --- MemoryMeter: exact counts on small graphs ------------------------------------------------


def test_saved_output_is_counted_and_freed_by_backward() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    with ncp.MemoryMeter() as meter:
        y = x.exp()  # ExpBackward saves its output, nothing else
        assert meter.saved_bytes == 15 * F32
        y.sum().backward()  # SumBackward saves no tensor
        assert meter.saved_bytes == 0
    assert meter.peak_saved_bytes == 15 * F32


def test_same_tensor_saved_several_times_counts_once() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    with ncp.MemoryMeter() as meter:
        a = x.exp()  # saves a
        b = a * a  # saves a twice more: one storage in all
        assert meter.saved_bytes == 15 * F32
        b.sum().backward()
    assert meter.peak_saved_bytes == 15 * F32
    assert meter.saved_bytes == 0


def test_views_of_one_storage_count_the_whole_storage_once() -> None:
    x = torch.randn(4, 5, requires_grad=True)
    c = torch.randn(12, 5)  # needs no grad, so each product saves only its view of c
    with ncp.MemoryMeter() as meter:
        u = x * c[:4]
        v = x * c[4:8]
        # Two 80-byte views of one 240-byte storage: the storage is what stays alive, once
        # (not 2 x 80 for the views, nor 2 x 240 for each view's storage).
        assert meter.saved_bytes == c.numel() * F32
        del u
        assert meter.saved_bytes == c.numel() * F32  # v still holds the storage
        del v
        assert meter.saved_bytes == 0
    assert meter.peak_saved_bytes == c.numel() * F32


def test_peak_keeps_the_maximum_after_tensors_are_freed() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    with ncp.MemoryMeter() as meter:
        a = x.sin()  # saves x
        b = (x + 1).sin()  # saves x + 1, a second storage (adding a scalar saves nothing)
        assert meter.saved_bytes == 2 * 15 * F32
        del a
        assert meter.saved_bytes == 15 * F32
        assert meter.peak_saved_bytes == 2 * 15 * F32
        assert meter.peak_saved_bytes >= meter.saved_bytes
        del b
    assert meter.saved_bytes == 0
    assert meter.peak_saved_bytes == 2 * 15 * F32


def test_graph_dropped_without_backward_is_subtracted() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    with ncp.MemoryMeter() as meter:
        y = x.sin().sin().sin()  # each sin saves its input: x and two intermediates
        assert meter.saved_bytes == 3 * 15 * F32
        del y  # no backward: dropping the graph frees its saved tensors
        assert meter.saved_bytes == 0
    assert meter.peak_saved_bytes == 3 * 15 * F32


def test_graph_with_saved_output_dropped_without_backward_is_subtracted() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    with ncp.MemoryMeter() as meter:
        y = x.exp()
        del y
    gc.collect()
    assert meter.saved_bytes == 0


def test_tensors_saved_after_exit_are_not_counted_and_the_meter_is_reusable() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    meter = ncp.MemoryMeter()
    with meter:
        a, b = x.sin(), (x + 1).sin()
        del a, b
    assert meter.peak_saved_bytes == 2 * 15 * F32
    y = x.sin()
    assert meter.saved_bytes == 0 and meter.peak_saved_bytes == 2 * 15 * F32
    del y
    with meter:  # a second use starts a new peak
        z = (x + 1).sin()
        assert meter.saved_bytes == 15 * F32
    del z
    assert meter.saved_bytes == 0
    assert meter.peak_saved_bytes == 15 * F32


def test_reentering_an_active_meter_raises() -> None:
    meter = ncp.MemoryMeter()
    x = torch.randn(3, 5, requires_grad=True)
    with meter:
        with pytest.raises(RuntimeError, match="already active"), meter:
            pass
        y = x.sin()  # the failed re-entry left the active hooks in place
        assert meter.saved_bytes == 15 * F32
    del y
    assert meter.saved_bytes == 0


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")])
def test_peak_cuda_bytes_is_none_on_cpu(device: str | torch.device | None) -> None:
    x = torch.randn(3, 5, requires_grad=True)
    with ncp.MemoryMeter(device) as meter:
        x.exp().sum().backward()
    assert meter.peak_cuda_bytes is None
    assert meter.peak_saved_bytes == 15 * F32
    assert "peak_cuda_bytes" not in repr(meter)


@pytest.mark.cuda  # skipped without a GPU (tests/conftest.py)
def test_peak_cuda_bytes_covers_the_tensors_allocated_inside() -> None:
    x = torch.randn(256, 256, device="cuda", requires_grad=True)
    with ncp.MemoryMeter("cuda") as meter:
        y = x.exp()  # a 256 KiB output, saved for backward
        y.sum().backward()
    assert meter.peak_cuda_bytes is not None
    assert meter.peak_cuda_bytes >= x.numel() * F32
    assert meter.peak_saved_bytes == x.numel() * F32


# --- ncp.meta_step on SIREN: the acceptance bounds --------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Run this module on one intra-op thread, restoring the count afterwards.

    Byte counts do not depend on threads; time does. On a shared 2-core runner two threads
    oversubscribe the cores and these SIREN steps ran ~6x slower (95 s against 15 s here).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CONFIGS = {
    "maml16": ncp.MetaConfig(inner_steps=16, pruner=None, bootstrap=None),
    "maml4": ncp.MetaConfig(inner_steps=4, pruner=None, bootstrap=None),
    "gradncp": ncp.MetaConfig(),  # K=16, ratio 0.25, bootstrap L=5
}


def smooth_images(resolution: int, tasks: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates on [-1, 1]^2 ``(tasks, resolution**2, 2)`` and smooth RGB values in [0, 1]
    ``(tasks, resolution**2, 3)``: a few random low-frequency plane waves per channel."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1.0, 1.0, resolution)
    coords = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    freqs = (torch.rand(tasks, 3, 4, 2, generator=g) * 2 - 1) * 3.0
    phases = torch.rand(tasks, 3, 4, 1, generator=g) * 2 * math.pi
    waves = torch.sin(math.pi * torch.einsum("tcwd,pd->tcwp", freqs, coords) + phases)
    y = waves.mean(2).transpose(1, 2) * 0.5 + 0.5
    return coords.expand(tasks, -1, -1).contiguous(), y.contiguous()


def siren(**kwargs: int) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _models.siren(**kwargs)


def measure(
    model: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    cfg: ncp.MetaConfig,
    *,
    backward: bool,
) -> int:
    """Peak saved bytes of one outer step; checks that nothing stays saved afterwards.

    Saved tensors only accumulate before ``backward`` (which frees them and, without
    ``create_graph``, saves nothing new), so the peak of ``meta_step`` alone is the peak of the
    whole step: ``test_backward_adds_nothing_to_the_peak`` checks this, and ``backward=False``
    skips the costly backward of MAML K=16.
    """
    with ncp.MemoryMeter() as meter:
        out = ncp.meta_step(model, batch, cfg)
        peak = meter.peak_saved_bytes
        if backward:
            out.loss.backward()
            assert meter.peak_saved_bytes == peak
        del out
    model.zero_grad(set_to_none=True)
    assert meter.saved_bytes == 0, "the graph of meta_step outlived its result"
    return peak


@functools.cache
def siren_peak(variant: str, resolution: int) -> int:
    """Peak saved bytes of one outer step of ``variant`` on SIREN 5x256, 4 smooth RGB images.

    MAML is measured without backward (see ``measure``); GradNCP runs its backward, which
    adds nothing to the peak (``test_backward_adds_nothing_to_the_peak``).
    """
    return measure(
        siren(), smooth_images(resolution, 4), CONFIGS[variant], backward=variant == "gradncp"
    )


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_backward_adds_nothing_to_the_peak(variant: str) -> None:
    model = siren(hidden=32)
    batch = smooth_images(8, 2)
    with ncp.MemoryMeter() as meter:
        out = ncp.meta_step(model, batch, CONFIGS[variant])
        before = meter.peak_saved_bytes
        out.loss.backward()
        del out
    assert before > 0
    assert meter.peak_saved_bytes == before
    assert meter.saved_bytes == 0


def test_maml_saved_bytes_grow_by_the_same_amount_per_inner_step() -> None:
    model = siren(hidden=32)
    batch = smooth_images(8, 2)
    peaks = [
        measure(
            model, batch, ncp.MetaConfig(inner_steps=k, pruner=None, bootstrap=None), backward=False
        )
        for k in (1, 2, 3, 5)
    ]
    step = peaks[1] - peaks[0]
    assert step > 0
    assert peaks[2] - peaks[1] == step
    assert peaks[3] - peaks[2] == 2 * step


def test_gradncp_saves_at_most_1_1x_maml_k4_at_64x64() -> None:
    """Issue acceptance: GradNCP (K=16, ratio 0.25, L=5) <= 1.1 x MAML (K=4), 64x64, 4 tasks.

    Measured at full size on purpose: GradNCP's 12 extra steps each save parameter-sized
    tensors (~40 MB in all, whatever the resolution), so at 32x32 the ratio is 1.11, not 1.03.
    """
    gradncp, maml4 = siren_peak("gradncp", 64), siren_peak("maml4", 64)
    assert gradncp <= 1.1 * maml4, f"GradNCP {gradncp / 1e6:.0f} MB, MAML K=4 {maml4 / 1e6:.0f} MB"


def test_gradncp_saves_at_most_0_35x_maml_k16_at_32x32() -> None:
    """The K=16 bound at a quarter of the points, cheap enough to run by default.

    Saved bytes scale with the points except for the parameter-sized tensors each inner step
    saves, the same 16 steps' worth in both methods. That constant weighs more at 32x32 and
    pulls the ratio towards 1 (0.30 here against 0.28 at 64x64), so this check is the stricter.
    """
    gradncp, maml16, maml4 = (siren_peak(v, 32) for v in ("gradncp", "maml16", "maml4"))
    assert maml16 > 3 * maml4  # the inner graph dominates: MAML's bytes grow with K
    assert gradncp <= 0.35 * maml16, (
        f"GradNCP {gradncp / 1e6:.0f} MB, MAML K=16 {maml16 / 1e6:.0f} MB"
    )


@pytest.mark.slow
def test_gradncp_saves_at_most_0_35x_maml_k16_at_64x64() -> None:
    """Issue acceptance: GradNCP <= 0.35 x MAML (K=16, full context), 64x64, 4 tasks.

    MAML K=16 keeps ~5.3 GB of saved tensors (~7 GB resident) and ~20 s to build on one CPU
    thread; the default run checks the same bound at 32x32.
    """
    gradncp, maml16 = siren_peak("gradncp", 64), siren_peak("maml16", 64)
    assert gradncp <= 0.35 * maml16, (
        f"GradNCP {gradncp / 1e6:.0f} MB, MAML K=16 {maml16 / 1e6:.0f} MB"
    )
