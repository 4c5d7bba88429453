"""Signals as ncp context sets: coordinates and values, as in the paper (Sec. 3).

Every function here turns a batch of signals with a leading task dimension into ncp's context
``(x, y)``: ``x`` the coordinates ``(tasks, points, d)``, ``y`` the values ``(tasks, points, c)``,
with points in row-major order of the signal's grid.

=========  ====================  ===================================================
kind       signal shape          coordinates
=========  ====================  ===================================================
image      ``(tasks, H, W, C)``  ``[-1, 1]^2``, (row, column)
audio      ``(tasks, T)``        1-D grid on ``[-50, 50]`` (1 s = 16,000 points at 16 kHz)
video      ``(tasks, F, H, W, C)`` ``[-1, 1]^3``, (frame, row, column)
sphere     ``(tasks, Lat, Lon, C)`` 3-D Cartesian points on the unit sphere
=========  ====================  ===================================================
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

KINDS = ("image", "audio", "video", "sphere")
AUDIO_BOUND = 50.0


def grid(sizes: Sequence[int], bound: float = 1.0) -> Tensor:
    """Coordinates of a regular grid on ``[-bound, bound]^d``, ``(prod(sizes), d)``, row-major.

    Along each axis the first sample sits at ``-bound`` and the last at ``+bound``.

    Raises:
        ValueError: when a size is not an int >= 2 or ``bound`` is not positive.
    """
    if not sizes:
        raise ValueError("`sizes` must name at least one axis, got an empty sequence.")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"`sizes` entries must be ints >= 2, got {list(sizes)!r}.")
    if not bound > 0:
        raise ValueError(f"`bound` must be > 0, got {bound!r}.")
    axes = [torch.linspace(-bound, bound, n) for n in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


def grid_coordinates(height: int, width: int) -> Tensor:
    """Pixel coordinates on ``[-1, 1]^2``, ``(height * width, 2)``; point ``r * width + c`` is
    pixel ``(r, c)``."""
    for name, n in (("height", height), ("width", width)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"`{name}` must be an int >= 2, got {n!r}.")
    return grid((height, width))


def _check(signals: object, dims: int, name: str, layout: str) -> Tensor:
    if not isinstance(signals, Tensor) or signals.dim() != dims:
        got = tuple(signals.shape) if isinstance(signals, Tensor) else type(signals).__name__
        raise ValueError(
            f"`{name}` must be a tensor {layout}, got {got}; use .unsqueeze(0) for a single signal."
        )
    return signals


def image_context(images: Tensor) -> Tuple[Tensor, Tensor]:
    """Images ``(tasks, H, W, C)`` to ``x`` ``(tasks, H * W, 2)`` and ``y`` ``(tasks, H * W, C)``."""
    _check(images, 4, "images", "(tasks, height, width, channels)")
    tasks, h, w, c = images.shape
    coords = grid_coordinates(h, w).to(device=images.device, dtype=images.dtype)
    return coords.expand(tasks, h * w, 2), images.reshape(tasks, h * w, c)


def audio_context(waves: Tensor, bound: float = AUDIO_BOUND) -> Tuple[Tensor, Tensor]:
    """Waveforms ``(tasks, T)`` to ``x`` ``(tasks, T, 1)`` on ``[-bound, bound]`` and ``y``
    ``(tasks, T, 1)``.

    The paper's ``bound`` is 50 for 1 s clips. For shorter clips, ``50 * seconds`` keeps the
    paper's spacing between samples (and so the frequencies SIREN has to represent).
    """
    _check(waves, 2, "waves", "(tasks, samples)")
    tasks, t = waves.shape
    coords = grid((t,), bound).to(device=waves.device, dtype=waves.dtype)
    return coords.expand(tasks, t, 1), waves.unsqueeze(-1)


def video_context(videos: Tensor) -> Tuple[Tensor, Tensor]:
    """Videos ``(tasks, F, H, W, C)`` to ``x`` ``(tasks, F * H * W, 3)`` on ``[-1, 1]^3`` and
    ``y`` ``(tasks, F * H * W, C)``."""
    _check(videos, 5, "videos", "(tasks, frames, height, width, channels)")
    tasks, f, h, w, c = videos.shape
    coords = grid((f, h, w)).to(device=videos.device, dtype=videos.dtype)
    return coords.expand(tasks, f * h * w, 3), videos.reshape(tasks, f * h * w, c)


def frame_context(videos: Tensor) -> Tuple[Tensor, Tensor]:
    """Videos ``(tasks, F, H, W, C)`` as whole-frame points, for frame-decoding models such as
    NeRV: ``x`` ``(tasks, F, 1)``, the frame times on ``[-1, 1]``, and ``y`` the videos
    themselves, ``(tasks, F, H, W, C)``."""
    _check(videos, 5, "videos", "(tasks, frames, height, width, channels)")
    tasks, f = videos.shape[:2]
    times = torch.linspace(-1.0, 1.0, f, device=videos.device, dtype=videos.dtype)
    return times.view(1, f, 1).expand(tasks, f, 1), videos


def equal_angle_grid(n_lat: int, n_lon: int) -> Tuple[Tensor, Tensor]:
    """Equally spaced latitudes ``[-90, 90]`` (poles included) and longitudes ``[0, 360)`` in
    degrees, as ERA5's 0.25-degree grid (``equal_angle_grid(721, 1440)``)."""
    for name, n in (("n_lat", n_lat), ("n_lon", n_lon)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"`{name}` must be an int >= 2, got {n!r}.")
    lat = torch.linspace(-90.0, 90.0, n_lat, dtype=torch.float64)
    lon = torch.arange(n_lon, dtype=torch.float64) * (360.0 / n_lon)
    return lat, lon


def sphere_coordinates(lat: Tensor, lon: Tensor) -> Tensor:
    """Cartesian points on the unit sphere for every (latitude, longitude) pair in degrees.

    Returns ``(len(lat) * len(lon), 3)`` in row-major (latitude, longitude) order:
    ``(cos(lat) cos(lon), cos(lat) sin(lon), sin(lat))``.
    """
    for name, t in (("lat", lat), ("lon", lon)):
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise ValueError(f"`{name}` must be a 1-D tensor of degrees, got {t!r:.60}.")
    if bool((lat.abs() > 90).any()):
        raise ValueError(f"`lat` must lie in [-90, 90] degrees, got {lat.min()}..{lat.max()}.")
    la, lo = torch.meshgrid(lat * (math.pi / 180), lon * (math.pi / 180), indexing="ij")
    xyz = torch.stack([la.cos() * lo.cos(), la.cos() * lo.sin(), la.sin()], dim=-1)
    return xyz.reshape(-1, 3)


def sphere_context(fields: Tensor, lat: Tensor, lon: Tensor) -> Tuple[Tensor, Tensor]:
    """Gridded fields ``(tasks, Lat, Lon, C)`` to ``x`` ``(tasks, Lat * Lon, 3)`` (points on the
    unit sphere) and ``y`` ``(tasks, Lat * Lon, C)``."""
    _check(fields, 4, "fields", "(tasks, latitudes, longitudes, channels)")
    tasks, n_lat, n_lon, c = fields.shape
    if (len(lat), len(lon)) != (n_lat, n_lon):
        raise ValueError(
            f"`fields` has a {n_lat} x {n_lon} grid but `lat`/`lon` have {len(lat)} and "
            f"{len(lon)} entries; pass the coordinates of this grid."
        )
    coords = sphere_coordinates(lat, lon).to(device=fields.device, dtype=fields.dtype)
    return coords.expand(tasks, n_lat * n_lon, 3), fields.reshape(tasks, n_lat * n_lon, c)
