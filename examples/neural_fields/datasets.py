"""Data sets of signals with a train/test split, turned into ncp context batches.

:func:`build` returns a :class:`SignalSet` by name: the embedded ``text`` (no download), the
offline stand-ins of :mod:`standins` (``deep_sky``, ``photos``, ``speech``, ``climate``,
``video``), or the user's own folder or file (``image_folder``, ``audio_folder``,
``video_folder``, ``grid_file``, with ``root=``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor

from . import data, signals, standins
from .text_data import TextImages

STANDINS = ("text", "deep_sky", "photos", "speech", "climate", "video")
FOLDERS = ("image_folder", "audio_folder", "video_folder", "grid_file")
NAMES = STANDINS + FOLDERS


@dataclass
class SignalSet:
    """Signals of one kind with a fixed train/test split.

    Attributes:
        name: data set name.
        kind: ``"image"``, ``"audio"``, ``"video"`` or ``"sphere"`` (see :mod:`signals`).
        train_batch: ``train_batch(indices)`` stacks those training signals.
        n_train: number of training signals.
        test: the test signals, stacked.
        data_range: peak-to-peak range of the values, for PSNR.
        extra: grid coordinates for the sphere (``lat``, ``lon``, ``valid``).
        audio_bound: audio coordinates span ``[-audio_bound, audio_bound]``.
        frame_points: for video, make each frame one context point
            (:func:`signals.frame_context`, for frame-decoding models such as NeRV) instead of
            each pixel.
        frame_time: for images seen by a video model (cross-domain adaptation, the paper's
            Table 10): each image is one frame at this time, so its points are ``(t, row,
            column)`` like a video's; None (default) keeps the 2-D pixel coordinates.
    """

    name: str
    kind: str
    train_batch: Callable[[Sequence[int]], Tensor]
    n_train: int
    test: Tensor
    data_range: float = 1.0
    extra: Dict[str, Tensor] = field(default_factory=dict)
    audio_bound: float = signals.AUDIO_BOUND
    frame_points: bool = False
    frame_time: float | None = None

    @property
    def in_features(self) -> int:
        if self.frame_points:
            return 1
        if self.kind == "image" and self.frame_time is not None:
            return 3
        return {"image": 2, "audio": 1, "video": 3, "sphere": 3}[self.kind]

    @property
    def out_features(self) -> int:
        return 1 if self.kind == "audio" else int(self.test.shape[-1])

    def context(self, batch: Tensor) -> Tuple[Tensor, Tensor]:
        """ncp's ``(x, y)`` for a batch of signals of this set (see :mod:`signals`)."""
        if self.kind == "image":
            x, y = signals.image_context(batch)
            if self.frame_time is not None:  # one frame of a video at `frame_time`
                x = torch.cat([torch.full_like(x[..., :1], self.frame_time), x], dim=-1)
            return x, y
        if self.kind == "audio":
            return signals.audio_context(batch, self.audio_bound)
        if self.kind == "video":
            return (
                signals.frame_context(batch) if self.frame_points else signals.video_context(batch)
            )
        x, y = signals.sphere_context(batch, self.extra["lat"], self.extra["lon"])
        valid = self.extra["valid"].reshape(-1).to(batch.device)
        return x[:, valid], y[:, valid]

    def describe(self) -> str:
        """One line: kind, signal shape and split sizes."""
        shape = "x".join(str(s) for s in self.test.shape[1:])
        return f"{self.name} ({self.kind} {shape}): {self.n_train} train / {len(self.test)} test"


def _tensor_set(name: str, kind: str, signals_: Tensor, test_mask: Tensor, **kw: Any) -> SignalSet:
    train = signals_[~test_mask]
    if len(train) == 0 or int(test_mask.sum()) == 0:
        raise ValueError(
            f"data set {name!r} has {len(train)} train and {int(test_mask.sum())} test signals; "
            "both splits need at least one: provide more data or change `test_fraction`."
        )
    return SignalSet(
        name=name,
        kind=kind,
        train_batch=lambda idx: train[list(idx)],
        n_train=len(train),
        test=signals_[test_mask],
        **kw,
    )


def _split_by_source(sources: Tensor, test_fraction: float) -> Tensor:
    """Test mask holding out whole sources (files, photos): the last ``test_fraction`` of them."""
    unique = torch.unique(sources)
    n_test = max(1, round(test_fraction * len(unique)))
    return torch.isin(sources, unique[len(unique) - n_test :])


def _split_every(n: int, test_fraction: float) -> Tensor:
    """Test mask taking evenly spaced items (about ``test_fraction`` of ``n``, at least one)."""
    every = max(2, round(1 / test_fraction))
    mask = torch.arange(n) % every == every - 1
    if n >= 2 and not bool(mask.any()):  # fewer items than `every`: hold out the last one
        mask[-1] = True
    return mask


def build(
    name: str,
    *,
    resolution: int = 32,
    seconds: float = 0.25,
    frames: int = 8,
    grid_stride: int = 2,
    test_fraction: float = 0.1,
    root: str | None = None,
    variable: str | None = None,
    seed: int = 0,
    audio_bound: float = signals.AUDIO_BOUND,
) -> SignalSet:
    """The data set ``name`` at the given size.

    Args:
        name: one of :data:`NAMES`.
        resolution: image and video frame side.
        seconds: audio clip length (16 kHz).
        frames: video clip length.
        grid_stride: keep one latitude and longitude in ``grid_stride`` (climate).
        test_fraction: share of the signals held out (whole files or photos where the signals
            are cut from them).
        root: folder (or file for ``grid_file``) of the user's data.
        variable: netCDF / npz variable for ``grid_file``.
        seed: seed of the Text rendering and the photo crops.
        audio_bound: audio coordinates span ``[-audio_bound, audio_bound]`` (paper: 50 for 1 s).
    """
    if name not in NAMES:
        raise ValueError(f"`name` must be one of {list(NAMES)}, got {name!r}.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}.")
    if name in FOLDERS and root is None:
        raise ValueError(f"data set {name!r} reads your own data: pass `root` (--root PATH).")
    if name == "text":
        train = TextImages("train", resolution=resolution, seed=seed, length=10**6)
        test = TextImages("test", resolution=resolution, seed=seed, length=100)
        return SignalSet("text", "image", train.batch, len(train), test.batch(range(len(test))))
    if name in ("deep_sky", "image_folder"):
        images = (
            standins.deep_sky(resolution)
            if name == "deep_sky"
            else data.load_images(str(root), resolution)
        )
        return _tensor_set(name, "image", images, _split_every(len(images), test_fraction))
    if name == "photos":
        crops, sources = standins.photos(resolution, seed=seed)
        return _tensor_set(name, "image", crops, _split_by_source(sources, test_fraction))
    if name in ("speech", "audio_folder"):
        clips = (
            standins.speech(seconds)
            if name == "speech"
            else data.load_audio(str(root), seconds=seconds)
        )
        mask = _split_by_source(clips.sources, test_fraction)
        return _tensor_set(name, "audio", clips.data, mask, data_range=2.0, audio_bound=audio_bound)
    if name in ("video", "video_folder"):
        clips = (
            standins.video(frames, resolution)
            if name == "video"
            else data.load_videos(str(root), frames=frames, resolution=resolution)
        )
        return _tensor_set(name, "video", clips.data, _split_every(len(clips.data), test_fraction))
    if name == "climate":
        grid = standins.climate(grid_stride)
    else:
        if variable is None:
            raise ValueError("data set 'grid_file' needs `variable` (--variable NAME).")
        grid = data.load_grid(str(root), variable)
        grid = data.Grid(
            grid.fields[:, ::grid_stride, ::grid_stride],
            grid.lat[::grid_stride],
            grid.lon[::grid_stride],
            grid.valid[::grid_stride, ::grid_stride],
        )
    fields, _, _ = data.normalise(grid.fields, grid.valid)
    extra = {"lat": grid.lat, "lon": grid.lon, "valid": grid.valid}
    return _tensor_set(
        name, "sphere", fields, _split_every(len(fields), test_fraction), extra=extra
    )
