"""PSNR and SSIM of examples/neural_fields/metrics.py against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from examples.neural_fields import metrics


def test_psnr_by_hand_with_data_range():
    target = torch.zeros(2, 4)
    pred = torch.tensor([[0.1, 0.1, 0.1, 0.1], [1.0, 0.0, 0.0, 0.0]])
    # mse 0.01 -> 20 dB at range 1; mse 0.25 -> 10 log10(4 / 0.25) = 12.04 dB at range 2
    torch.testing.assert_close(metrics.psnr(pred, target), torch.tensor([20.0, 10 * math.log10(4)]))
    torch.testing.assert_close(
        metrics.psnr(pred, target, data_range=2.0)[1], torch.tensor(10 * math.log10(16))
    )
    assert metrics.mse_to_psnr(0.01) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="`data_range` must be > 0"):
        metrics.psnr(pred, target, data_range=0.0)


def test_gaussian_window_is_normalised_and_symmetric():
    w = metrics.gaussian_window(11, 1.5)
    assert w.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(w, w.flip(0))
    assert w.argmax().item() == 5
    # neighbours of the centre: exp(-1 / (2 * 1.5^2)) of it
    assert (w[4] / w[5]).item() == pytest.approx(math.exp(-1 / 4.5))


def test_ssim_of_identical_images_is_one():
    img = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(metrics.ssim(img, img), torch.ones(2))


def test_ssim_of_two_constant_images_is_the_luminance_term():
    a = torch.full((1, 12, 12, 1), 0.2, dtype=torch.float64)
    b = torch.full((1, 12, 12, 1), 0.6, dtype=torch.float64)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)  # variances are zero
    assert metrics.ssim(a, b).item() == pytest.approx(expected, rel=1e-5)


def test_ssim_single_window_by_hand():
    """An 11x11 grey image has exactly one window: SSIM is Wang et al.'s formula with the
    Gaussian weights, written out here with numpy."""
    rng = np.random.default_rng(1)
    a = rng.random((11, 11))
    b = np.clip(a + 0.1 * rng.standard_normal((11, 11)), 0, 1)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mu_a, mu_b = (w * a).sum(), (w * b).sum()
    va = (w * a * a).sum() - mu_a**2
    vb = (w * b * b).sum() - mu_b**2
    cov = (w * a * b).sum() - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (va + vb + c2)
    )
    got = metrics.ssim(
        torch.from_numpy(b).reshape(1, 11, 11, 1), torch.from_numpy(a).reshape(1, 11, 11, 1)
    )
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_ssim_falls_with_noise_and_averages_video_frames():
    gen = torch.Generator().manual_seed(2)
    img = torch.rand(1, 16, 16, 3, generator=gen)
    light = (img + 0.05 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
    heavy = (img + 0.3 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
    s_light, s_heavy = metrics.ssim(light, img).item(), metrics.ssim(heavy, img).item()
    assert 1 > s_light > s_heavy
    video_pred = torch.stack([light, heavy], dim=1)  # (1, 2 frames, 16, 16, 3)
    video_true = torch.stack([img, img], dim=1)
    assert metrics.ssim(video_pred, video_true).item() == pytest.approx((s_light + s_heavy) / 2)


def test_ssim_rejects_small_or_mismatched_images():
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(torch.zeros(1, 8, 8, 3), torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="same shape"):
        metrics.ssim(torch.zeros(1, 16, 16, 3), torch.zeros(2, 16, 16, 3))
    with pytest.raises(ValueError, match="images"):
        metrics.ssim(torch.zeros(1, 16, 3), torch.zeros(1, 16, 3))


def test_lpips_status_is_a_reason_or_available():
    status = metrics.lpips_status()
    if status != "available":
        assert status.startswith("LPIPS not reported")
        with pytest.raises(RuntimeError, match="LPIPS not reported"):
            metrics.lpips(torch.zeros(1, 16, 16, 3), torch.zeros(1, 16, 16, 3))
