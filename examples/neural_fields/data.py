"""Loaders for the paper's data sets, read from folders the user provides.

Each loader reads a standard layout and returns a float tensor with a leading signal dimension,
ready for :mod:`signals`:

- :func:`load_images`: any folder of images (CelebA ``img_align_celeba``, Imagenette, ImageNet,
  AFHQ, CelebA-HQ): centre square crop, resize, values in ``[0, 1]``, ``(N, R, R, 3)``.
- :func:`load_audio`: a folder of ``.flac`` / ``.wav`` / ``.ogg`` files (LibriSpeech), mono,
  resampled, cut into clips of ``seconds``, values in ``[-1, 1]``, ``(N, T)``.
- :func:`load_videos`: a folder of videos (UCF-101 ``.avi``), cut into clips of ``frames``
  frames, each frame centre-cropped and resized, ``(N, F, R, R, 3)``.
- :func:`load_grid`: an ERA5-style gridded field in netCDF (``.nc``, ``.cdf``) or ``.npz``,
  ``(N, Lat, Lon, 1)`` with its latitudes and longitudes.

Nothing is dropped without saying so: files that cannot be decoded raise, and the tail of an
audio file or video shorter than one clip is counted in the returned ``dropped`` figures.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm")
GRID_EXTENSIONS = (".nc", ".cdf", ".npz")


def list_files(root: str, extensions: Sequence[str], *, what: str) -> List[str]:
    """Files under ``root`` (recursively) whose name ends with one of ``extensions``, sorted.

    Raises:
        FileNotFoundError: when ``root`` is not a folder or holds no such file.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"`root` must be a folder of {what}, got {root!r} (not a folder).")
    found = sorted(
        p
        for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
        if p.lower().endswith(tuple(extensions)) and os.path.isfile(p)
    )
    if not found:
        raise FileNotFoundError(
            f"no {what} ({', '.join(extensions)}) found under {root!r}; point `root` at the "
            "folder that holds them."
        )
    return found


def _check_positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


def square_crop_resize(img: object, resolution: int) -> Tensor:
    """A PIL image, centre-cropped to a square and resized to ``resolution``, as a float tensor
    ``(resolution, resolution, 3)`` in ``[0, 1]``."""
    from PIL import Image

    assert isinstance(img, Image.Image)
    if img.mode == "P":  # palette images may carry transparency: go through RGBA
        img = img.convert("RGBA")
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).to(torch.float32) / 255.0


def load_images(root: str, resolution: int, *, limit: int | None = None) -> Tensor:
    """Images under ``root``, centre-cropped to a square and resized: ``(N, R, R, 3)`` in
    ``[0, 1]``.

    CelebA's ``img_align_celeba`` (178x218) gives the paper's 178x178 crops at
    ``resolution=178``.

    Args:
        root: folder searched recursively for :data:`IMAGE_EXTENSIONS`.
        resolution: output side in pixels.
        limit: read at most this many files (the first in sorted order).
    """
    from PIL import Image

    _check_positive_int("resolution", resolution, 2)
    files = list_files(root, IMAGE_EXTENSIONS, what="images")
    if limit is not None:
        _check_positive_int("limit", limit)
        files = files[:limit]
    out = []
    for path in files:
        with Image.open(path) as img:
            out.append(square_crop_resize(img, resolution))
    return torch.stack(out)


def resample(wave: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (``scipy.signal.resample_poly``) from ``rate`` to ``target_rate`` Hz.

    22,050 Hz to 16,000 Hz uses up/down = 320/441.
    """
    if rate == target_rate:
        return wave
    from scipy.signal import resample_poly

    ratio = Fraction(target_rate, rate)
    return resample_poly(wave, ratio.numerator, ratio.denominator, axis=0)


@dataclass(frozen=True)
class Clips:
    """Fixed-length pieces cut from longer recordings.

    Attributes:
        data: the clips, a leading clip dimension.
        sources: for each clip, the index of the file it came from.
        dropped: samples (audio) or frames (video) at the ends of files that did not fill a
            whole clip.
    """

    data: Tensor
    sources: Tensor
    dropped: int


def load_audio(
    root: str,
    *,
    seconds: float = 1.0,
    sample_rate: int = 16_000,
    limit: int | None = None,
) -> Clips:
    """Speech under ``root`` (LibriSpeech ``.flac``; ``.wav``, ``.ogg``) as clips ``(N, T)``.

    Each file is read with ``soundfile``, averaged to mono, resampled to ``sample_rate`` and
    cut into consecutive clips of ``T = round(seconds * sample_rate)`` samples (1 s at 16 kHz:
    the paper's 16,000 points). Values stay in ``[-1, 1]`` (the few samples that resampling
    pushes past full scale are clipped).

    Args:
        root: folder searched recursively for :data:`AUDIO_EXTENSIONS`.
        seconds: clip length.
        sample_rate: output rate in Hz.
        limit: stop after this many clips.
    """
    import soundfile

    if not seconds > 0:
        raise ValueError(f"`seconds` must be > 0, got {seconds!r}.")
    _check_positive_int("sample_rate", sample_rate)
    length = round(seconds * sample_rate)
    if length < 2:
        raise ValueError(f"`seconds`={seconds} gives {length} samples; use a longer clip.")
    clips: List[np.ndarray] = []
    sources: List[int] = []
    dropped = 0
    for i, path in enumerate(list_files(root, AUDIO_EXTENSIONS, what="audio files")):
        wave, rate = soundfile.read(path, dtype="float32", always_2d=True)
        # resampling can overshoot a full-scale file slightly: clip back to [-1, 1]
        wave = np.clip(resample(wave.mean(axis=1), int(rate), sample_rate), -1.0, 1.0)
        n = len(wave) // length
        dropped += len(wave) - n * length
        clips += [wave[j * length : (j + 1) * length] for j in range(n)]
        sources += [i] * n
        if limit is not None and len(clips) >= limit:
            break
    if limit is not None:
        clips, sources = clips[:limit], sources[:limit]
    if not clips:
        raise ValueError(f"no file under {root!r} is at least {seconds} s long; use shorter clips.")
    data = torch.from_numpy(np.stack(clips).astype(np.float32))
    return Clips(data, torch.tensor(sources), dropped)


def load_videos(
    root: str,
    *,
    frames: int = 16,
    resolution: int = 64,
    stride: int = 1,
    limit: int | None = None,
) -> Clips:
    """Videos under ``root`` (UCF-101 ``.avi``) as clips ``(N, F, R, R, 3)`` in ``[0, 1]``.

    Frames are decoded with PyAV, every ``stride``-th frame is kept, and consecutive runs of
    ``frames`` kept frames form the clips; each frame is centre-cropped to a square and resized.

    Args:
        root: folder searched recursively for :data:`VIDEO_EXTENSIONS`.
        frames: frames per clip (the paper: 16 for UCF-101 at 128x128).
        resolution: frame side in pixels.
        stride: keep one frame in ``stride``.
        limit: stop after this many clips.
    """
    import av

    _check_positive_int("frames", frames, 2)
    _check_positive_int("resolution", resolution, 2)
    _check_positive_int("stride", stride)
    clips: List[Tensor] = []
    sources: List[int] = []
    dropped = 0
    for i, path in enumerate(list_files(root, VIDEO_EXTENSIONS, what="videos")):
        kept: List[Tensor] = []
        with av.open(path) as container:
            for j, frame in enumerate(container.decode(video=0)):
                if j % stride == 0:
                    kept.append(square_crop_resize(frame.to_image(), resolution))
        n = len(kept) // frames
        dropped += len(kept) - n * frames
        clips += [torch.stack(kept[k * frames : (k + 1) * frames]) for k in range(n)]
        sources += [i] * n
        if limit is not None and len(clips) >= limit:
            break
    if limit is not None:
        clips, sources = clips[:limit], sources[:limit]
    if not clips:
        raise ValueError(f"no video under {root!r} has {frames} frames; use fewer `frames`.")
    return Clips(torch.stack(clips), torch.tensor(sources), dropped)


@dataclass(frozen=True)
class Grid:
    """Gridded fields on the sphere.

    Attributes:
        fields: ``(N, Lat, Lon, 1)``, one field per time step.
        lat: latitudes in degrees ``(Lat,)``, increasing.
        lon: longitudes in degrees ``(Lon,)``.
        valid: ``(Lat, Lon)`` bool, the points with a value in every field (missing values such
            as netCDF's ``-1e34`` are False).
    """

    fields: Tensor
    lat: Tensor
    lon: Tensor
    valid: Tensor


def _read_netcdf(path: str, variable: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    from scipy.io import netcdf_file

    with netcdf_file(path, "r", mmap=False) as f:
        if variable not in f.variables:
            raise KeyError(
                f"`variable`={variable!r} is not in {path!r}; it has {sorted(f.variables)}."
            )
        var = f.variables[variable]
        dims = var.dimensions
        if len(dims) != 3:
            raise ValueError(
                f"`variable`={variable!r} must be (time, lat, lon), got dimensions {dims}."
            )
        data = np.array(var[:], dtype=np.float64)
        lat = np.array(f.variables[dims[1]][:], dtype=np.float64)
        lon = np.array(f.variables[dims[2]][:], dtype=np.float64)
        missing = getattr(var, "missing_value", getattr(var, "_FillValue", np.nan))
        scale = float(getattr(var, "scale_factor", 1.0))
        offset = float(getattr(var, "add_offset", 0.0))
    missing_mask = np.isclose(data, float(missing)) | ~np.isfinite(data)
    data = data * scale + offset
    data[missing_mask] = np.nan
    return data, lat, lon, float(missing)


def load_grid(path: str, variable: str) -> Grid:
    """One variable of an ERA5-style gridded file, ``(time, lat, lon)``.

    netCDF files (``.nc``, ``.cdf``, classic format, read with ``scipy.io.netcdf_file``) take the
    latitude and longitude from the variable's dimensions and mark ``missing_value`` /
    ``_FillValue`` points as missing. ``.npz`` files must hold ``lat``, ``lon`` and ``variable``;
    NaNs are missing. Latitudes are sorted increasing.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`path` must be a netCDF or .npz file, got {path!r} (no file).")
    if not path.lower().endswith(GRID_EXTENSIONS):
        raise ValueError(f"`path` must end with one of {GRID_EXTENSIONS}, got {path!r}.")
    if path.lower().endswith(".npz"):
        with np.load(path) as f:
            for key in ("lat", "lon", variable):
                if key not in f:
                    raise KeyError(f"{path!r} must hold arrays 'lat', 'lon' and {variable!r}.")
            data = np.array(f[variable], dtype=np.float64)
            lat, lon = np.array(f["lat"], np.float64), np.array(f["lon"], np.float64)
    else:
        data, lat, lon, _ = _read_netcdf(path, variable)
    if data.ndim != 3 or data.shape[1:] != (len(lat), len(lon)):
        raise ValueError(
            f"{variable!r} must have shape (time, {len(lat)}, {len(lon)}), got {data.shape}."
        )
    order = np.argsort(lat)
    data, lat = data[:, order], lat[order]
    valid = np.isfinite(data).all(axis=0)
    fields = torch.from_numpy(np.nan_to_num(data, nan=0.0)).to(torch.float32).unsqueeze(-1)
    return Grid(fields, torch.from_numpy(lat), torch.from_numpy(lon), torch.from_numpy(valid))


def normalise(data: Tensor, valid: Tensor | None = None) -> Tuple[Tensor, float, float]:
    """Min-max scale ``data`` to ``[0, 1]`` over the whole set (over ``valid`` points only).

    Returns:
        The scaled data and the ``(low, high)`` used, to map predictions back.
    """
    values = data if valid is None else data[..., valid, :]
    low, high = float(values.min()), float(values.max())
    if not math.isfinite(low) or high <= low:
        raise ValueError(f"cannot normalise constant or non-finite data (min {low}, max {high}).")
    return (data - low) / (high - low), low, high
