"""Reconstruction metrics of the paper's tables: PSNR, SSIM (Wang et al., 2004) and LPIPS.

PSNR and SSIM are written in torch here and follow the inputs' device and dtype. LPIPS needs the
``lpips`` package and its pretrained network weights, which cannot be downloaded on an offline
machine; :func:`lpips_status` says whether it can be computed.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _pair(pred: object, target: object) -> Tuple[Tensor, Tensor]:
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"`pred` and `target` must be tensors, got {type(pred).__name__} and "
            f"{type(target).__name__}."
        )
    if pred.shape != target.shape or pred.dim() < 1:
        raise ValueError(
            f"`pred` and `target` must have the same shape (tasks, ...), got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}."
        )
    return pred, target


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB, one value per task.

    ``10 * log10(data_range**2 / mse)``, with the mean squared error over all but the first
    dimension. Clamp ``pred`` to the signal's range first to score what would be displayed or
    played.

    Args:
        pred: ``(tasks, ...)``.
        target: same shape as ``pred``.
        data_range: peak-to-peak range of the signal (1 for images in ``[0, 1]``, 2 for audio in
            ``[-1, 1]``).

    Returns:
        ``(tasks,)``; ``inf`` where ``pred == target``.
    """
    pred, target = _pair(pred, target)
    if not data_range > 0:
        raise ValueError(f"`data_range` must be > 0, got {data_range!r}.")
    mse = (pred - target).pow(2).reshape(pred.shape[0], -1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """The normalised 1-D Gaussian ``(size,)`` whose outer product is SSIM's window."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"`size` must be a positive odd int, got {size!r}.")
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(offsets**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(
    pred: Tensor,
    target: Tensor,
    data_range: float = 1.0,
    *,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> Tensor:
    """Structural similarity of images, one value per task (video: the mean over frames).

    The standard SSIM of Wang et al. (2004): local means, variances and covariance under an
    ``window x window`` Gaussian window (sigma 1.5), ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``
    with ``R = data_range``, the SSIM map averaged over all valid window positions (no padding)
    and over channels. This is the setting of scikit-image's ``structural_similarity`` with
    ``gaussian_weights=True, use_sample_covariance=False``.

    Args:
        pred: images ``(tasks, H, W, C)`` or videos ``(tasks, F, H, W, C)``; H and W at least
            ``window``.
        target: same shape as ``pred``.
        data_range: peak-to-peak range of the values.

    Returns:
        ``(tasks,)`` in ``[-1, 1]``; 1 where ``pred == target``.
    """
    pred, target = _pair(pred, target)
    if pred.dim() not in (4, 5):
        raise ValueError(
            "`pred` must be images (tasks, H, W, C) or videos (tasks, F, H, W, C), got shape "
            f"{tuple(pred.shape)}."
        )
    h, w = pred.shape[-3], pred.shape[-2]
    if min(h, w) < window:
        raise ValueError(
            f"`ssim` needs images of at least {window}x{window} pixels, got {h}x{w}; pass a "
            "smaller `window`."
        )
    tasks, c = pred.shape[0], pred.shape[-1]
    dtype = torch.promote_types(pred.dtype, torch.float32)
    # (tasks * frames * channels, 1, H, W)

    def to_planes(t: Tensor) -> Tensor:
        return t.to(dtype).reshape(-1, h, w, c).permute(0, 3, 1, 2).reshape(-1, 1, h, w)

    a, b = to_planes(pred), to_planes(target)
    g = gaussian_window(window, sigma).to(device=pred.device, dtype=dtype)
    kernel = (g[:, None] * g[None, :])[None, None]

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).reshape(tasks, -1).mean(dim=1)


def lpips_status() -> str:
    """``"available"`` when the ``lpips`` package and its weights can be loaded offline, else a
    sentence saying why LPIPS is not reported."""
    if importlib.util.find_spec("lpips") is None:
        return (
            "LPIPS not reported: the `lpips` package is not installed, and its AlexNet weights "
            "cannot be downloaded on an offline machine."
        )
    return "available"


def lpips(pred: Tensor, target: Tensor) -> Tensor:
    """LPIPS (AlexNet) per task for images ``(tasks, H, W, 3)`` in ``[0, 1]``; lower is better.

    Raises:
        RuntimeError: when :func:`lpips_status` is not ``"available"`` or the weights fail to load.
    """
    status = lpips_status()
    if status != "available":
        raise RuntimeError(status)
    import lpips as lpips_pkg  # optional; never a dependency of ncp

    pred, target = _pair(pred, target)
    try:
        net = lpips_pkg.LPIPS(net="alex", verbose=False).to(pred.device)
    except Exception as err:  # the package downloads torchvision weights on first use
        raise RuntimeError(
            f"LPIPS weights could not be loaded ({err}); report without LPIPS."
        ) from err
    with torch.no_grad():
        a, b = (t.permute(0, 3, 1, 2) * 2 - 1 for t in (pred, target))
        return net(a, b).reshape(-1)


def mse_to_psnr(mse: float, data_range: float = 1.0) -> float:
    """The PSNR in dB of a mean squared error."""
    return 10.0 * math.log10(data_range**2 / mse) if mse > 0 else math.inf
