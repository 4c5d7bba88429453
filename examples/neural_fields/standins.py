"""Real stand-ins for the paper's data sets that can be had offline (see ``shared/DATA.md``).

Each stand-in lives in a Debian package. On first use the package is fetched with
``apt-get download`` and unpacked with ``dpkg-deb`` into a cache folder: ``$NCP_CACHE`` when set,
else ``~/.cache/ncp``; never into the repository. A message on stderr says what is fetched and
where. Nothing is installed system-wide.

=================  =====================  ==========================================
paper data set     stand-in               Debian package
=================  =====================  ==========================================
CelebA             deep-sky photographs   ``stellarium-data`` (nebulae only)
Imagenette         crops of real photos   ``mate-backgrounds``
LibriSpeech        Czech voice acting     ``fillets-ng-data-cs`` (22.05 kHz -> 16 kHz)
ERA5               monthly global winds   ``ferret-datasets`` (``monthly_navy_winds.cdf``)
UCF-101            a street video         ``opencv-doc`` (``vtest.avi``)
=================  =====================  ==========================================
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from typing import Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from . import data

PACKAGES = {
    "deep_sky": ("stellarium-data", "./usr/share/stellarium/nebulae/*"),
    "photos": ("mate-backgrounds", None),
    "speech": ("fillets-ng-data-cs", None),
    "climate": ("ferret-datasets", None),
    "video": ("opencv-doc", None),
}
PATHS = {
    "deep_sky": "usr/share/stellarium/nebulae/default",
    "photos": "usr/share/backgrounds/mate/nature",
    "speech": "usr/share/games/fillets-ng/sound",
    "climate": "usr/share/ferret-vis/data/monthly_navy_winds.cdf",
    "video": "usr/share/doc/opencv-doc/examples/data",
}


def cache_dir() -> str:
    """``$NCP_CACHE`` if set, else ``~/.cache/ncp``."""
    return os.environ.get("NCP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ncp")


def _run(cmd: Sequence[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)


def fetch(name: str) -> str:
    """The path of stand-in ``name`` in the cache, fetching its Debian package on first use.

    Raises:
        ValueError: for an unknown ``name``.
        RuntimeError: when ``apt-get download`` or ``dpkg-deb`` fails (with their output).
    """
    if name not in PACKAGES:
        raise ValueError(f"`name` must be one of {sorted(PACKAGES)}, got {name!r}.")
    root = os.path.join(cache_dir(), "root")
    target = os.path.join(root, PATHS[name])
    if os.path.exists(target):
        return target
    package, members = PACKAGES[name]
    debs = os.path.join(cache_dir(), "debs")
    os.makedirs(debs, exist_ok=True)
    os.makedirs(root, exist_ok=True)
    sys.stderr.write(
        f"ncp examples: the {name!r} stand-in needs the Debian package {package!r}; fetching it "
        f"with apt-get download into {debs} (once; set NCP_CACHE to change the folder).\n"
    )
    found = glob.glob(os.path.join(debs, f"{package}_*.deb"))
    if not found:
        done = _run(["apt-get", "download", package], debs)
        if done.returncode != 0:
            lists = os.path.join(cache_dir(), "apt-lists")
            os.makedirs(os.path.join(lists, "partial"), exist_ok=True)
            opts = ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache_dir()}"]
            _run(["apt-get", *opts, "update"], debs)
            done = _run(["apt-get", *opts, "download", package], debs)
        found = glob.glob(os.path.join(debs, f"{package}_*.deb"))
        if done.returncode != 0 or not found:
            raise RuntimeError(
                f"could not fetch {package!r} with apt-get download:\n{done.stderr.strip()}\n"
                f"Download {package}_*.deb by hand into {debs} and run again."
            )
    deb = sorted(found)[-1]
    if members is None:
        done = _run(["dpkg-deb", "-x", deb, root], debs)
    else:  # unpack only part of a large package
        cmd = f"dpkg-deb --fsys-tarfile '{deb}' | tar -x -C '{root}' --wildcards '{members}'"
        done = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not os.path.exists(target):
        raise RuntimeError(f"could not unpack {deb} into {root}:\n{done.stderr.strip()}")
    sys.stderr.write(f"ncp examples: {name!r} is ready under {target}.\n")
    return target


def _cached(key: str) -> str:
    folder = os.path.join(cache_dir(), "tensors")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, key + ".pt")


def deep_sky(resolution: int, *, dark_fraction: float = 0.9) -> Tensor:
    """Deep-sky photographs (CelebA stand-in: one centred object per image) ``(N, R, R, 3)``.

    The images of ``stellarium-data`` with fewer than ``dark_fraction`` dark pixels (below
    0.1 in every channel) after cropping and resizing (about 450 of 559).
    """
    path = _cached(f"deep_sky_{resolution}_{dark_fraction}")
    if os.path.exists(path):
        return torch.load(path)
    images = data.load_images(fetch("deep_sky"), resolution)
    dark = (images < 0.1).all(dim=-1).flatten(1).float().mean(dim=1)
    images = images[dark < dark_fraction]
    torch.save(images, path)
    return images


def photos(resolution: int, *, crops: int = 40, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Random square crops of real photographs (Imagenette/ImageNet stand-in).

    From every photo in ``mate-backgrounds``' ``nature`` folder (12 photos, 1600-5120 px), ``crops`` crops
    whose side is drawn uniformly between 1/8 and 1/2 of the photo's shorter side, resized to
    ``resolution``.

    Returns:
        Crops ``(N, R, R, 3)`` and the index of the photo each came from ``(N,)`` (split by
        photo so that no test crop overlaps a training one).
    """
    from PIL import Image

    path = _cached(f"photos_{resolution}_{crops}_{seed}")
    if os.path.exists(path):
        saved = torch.load(path)
        return saved["crops"], saved["sources"]
    rng = np.random.default_rng(seed)
    out, sources = [], []
    files = data.list_files(fetch("photos"), data.IMAGE_EXTENSIONS, what="images")
    for i, file in enumerate(files):
        with Image.open(file) as img:
            img = img.convert("RGB")
            img.draft("RGB", (img.size[0] // 2, img.size[1] // 2))
            w, h = img.size
            for _ in range(crops):
                side = int(rng.uniform(1 / 8, 1 / 2) * min(w, h))
                left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                crop = img.crop((left, top, left + side, top + side))
                out.append(data.square_crop_resize(crop, resolution))
                sources.append(i)
    result = torch.stack(out), torch.tensor(sources)
    torch.save({"crops": result[0], "sources": result[1]}, path)
    return result


def speech(seconds: float, *, sample_rate: int = 16_000) -> data.Clips:
    """Voice-acted Czech speech (LibriSpeech stand-in), 22.05 kHz resampled to 16 kHz, cut into
    clips of ``seconds`` (1,882 files, about 106 minutes)."""
    path = _cached(f"speech_{seconds}_{sample_rate}")
    if os.path.exists(path):
        saved = torch.load(path)
        return data.Clips(saved["data"], saved["sources"], int(saved["dropped"]))
    clips = data.load_audio(fetch("speech"), seconds=seconds, sample_rate=sample_rate)
    keep = clips.data.abs().amax(dim=1) > 0.01  # some files hold a silent stretch
    clips = data.Clips(clips.data[keep], clips.sources[keep], clips.dropped)
    saved = {"data": clips.data, "sources": clips.sources, "dropped": clips.dropped}
    torch.save(saved, path)
    return clips


def climate(stride: int = 1) -> data.Grid:
    """Monthly mean global winds 1982-1992 (ERA5 stand-in): the U and V components of
    ``monthly_navy_winds.cdf`` (132 months each, 73 x 144 on a 2.5-degree grid, no missing
    values) as 264 fields; every ``stride``-th latitude and longitude."""
    path = fetch("climate")
    u, v = data.load_grid(path, "UWND"), data.load_grid(path, "VWND")
    fields = torch.cat([u.fields, v.fields])[:, ::stride, ::stride]
    return data.Grid(
        fields, u.lat[::stride], u.lon[::stride], (u.valid & v.valid)[::stride, ::stride]
    )


def video(frames: int, resolution: int, *, stride: int = 2) -> data.Clips:
    """Clips of ``frames`` frames from OpenCV's ``vtest.avi`` (795 frames of a street scene):
    the UCF-101 stand-in; one frame in ``stride``."""
    path = _cached(f"video_{frames}_{resolution}_{stride}")
    if os.path.exists(path):
        saved = torch.load(path)
        return data.Clips(saved["data"], saved["sources"], int(saved["dropped"]))
    clips = data.load_videos(fetch("video"), frames=frames, resolution=resolution, stride=stride)
    torch.save({"data": clips.data, "sources": clips.sources, "dropped": clips.dropped}, path)
    return clips
