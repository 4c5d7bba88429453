"""A Learnit-style *Text* image data set, rendered on the fly (no download).

Learnit (Tancik et al., 2021) and GradNCP (Tack et al., 2023) use images of random strings in
random fonts and colours at 178x178. :class:`TextImages` renders such images with Pillow from the
fonts that ship with matplotlib (and Debian's DejaVu fonts when installed), deterministically per
``(seed, split, index)``, so the train and test splits differ and nothing is stored on disk.

Re-exported for the demo: :func:`image_context` (from ``signals``), which turns a batch of images
into ncp's context ``(coordinates, values)``, and :func:`psnr` (from ``metrics``).
"""

from __future__ import annotations

import functools
import glob
import os
import random
import string
from typing import Dict, List, Sequence, Tuple

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .metrics import psnr as psnr
from .signals import grid_coordinates as grid_coordinates
from .signals import image_context as image_context

ALPHABET = string.ascii_letters + string.digits
SPLITS = ("train", "test")

# Fonts that map letters to symbols, boxes or nothing; they pass no useful text.
_SYMBOL_FONTS = ("cmex", "cmsy", "STIXNonUni", "STIXSiz", "LastResort", "Display")
_SYSTEM_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu",)


def _font_dirs() -> List[str]:
    import matplotlib  # a dependency of the examples extra; imported late to keep startup light

    return [os.path.join(matplotlib.get_data_path(), "fonts", "ttf"), *_SYSTEM_FONT_DIRS]


@functools.cache
def load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    """The TrueType font at ``path`` in pixel ``size`` (cached)."""
    return ImageFont.truetype(path, size)


def renders_characters(path: str, characters: str, size: int = 24) -> bool:
    """True when the font at ``path`` draws every one of ``characters`` as its own ink, distinct
    from the missing-glyph box and from each other (fonts with symbol-only or partial tables
    fail). Also used by the many-shot example's glyph classes."""
    try:
        font = load_font(path, size)
    except OSError:
        return False
    missing = bytes(font.getmask("\U0010fffd"))
    masks = set()
    for ch in characters:
        mask = font.getmask(ch)
        data = bytes(mask)
        if mask.size[0] * mask.size[1] == 0 or not any(data) or data == missing:
            return False
        masks.add((mask.size, data))
    return len(masks) == len(characters)


def usable_fonts(
    dirs: Sequence[str | os.PathLike[str]],
    characters: str,
    *,
    suffixes: Tuple[str, ...] = (".ttf",),
    excluded: Sequence[str] = (),
    recursive: bool = False,
    size: int = 24,
    hint: str = "",
) -> Tuple[str, ...]:
    """Paths of the fonts under ``dirs`` that draw every one of ``characters``
    (:func:`renders_characters`), one per file name (the first folder wins), sorted by name.

    Args:
        dirs: folders to search (missing ones are skipped).
        characters: what every font must draw.
        suffixes: file endings taken (compared in lower case).
        excluded: file names containing any of these (in any case) are left out.
        recursive: search sub-folders too.
        size: pixel size of the rendering test.
        hint: the fix suggested when nothing is found.

    Raises:
        RuntimeError: when no usable font is found.
    """
    found: Dict[str, str] = {}
    pattern = os.path.join("**", "*") if recursive else "*"
    for folder in dirs:
        for path in sorted(glob.glob(os.path.join(str(folder), pattern), recursive=recursive)):
            name = os.path.basename(path)
            if not name.lower().endswith(suffixes) or name in found:
                continue
            if any(bad.lower() in name.lower() for bad in excluded):
                continue
            if renders_characters(path, characters, size=size):
                found[name] = path
    if not found:
        raise RuntimeError(
            f"no usable {'/'.join(suffixes)} font found under {[str(d) for d in dirs]}; {hint}"
        )
    return tuple(found[name] for name in sorted(found))


@functools.cache
def find_fonts() -> Tuple[str, ...]:
    """Paths of the usable Latin fonts found on this machine, sorted by file name.

    Looks in matplotlib's ``mpl-data/fonts/ttf`` and ``/usr/share/fonts/truetype/dejavu``; a
    file name found in both counts once (matplotlib's copy wins). Symbol fonts and fonts that
    render any letter or digit as a box or as nothing are left out.

    Raises:
        RuntimeError: when no usable font is found.
    """
    return usable_fonts(
        _font_dirs(),
        ALPHABET,
        excluded=_SYMBOL_FONTS,
        hint='install matplotlib (pip install "ncp[examples]") or pass `fonts=` to TextImages.',
    )


def _luminance(rgb: Sequence[int]) -> float:
    r, g, b = (c / 255.0 for c in rgb)
    return 0.299 * r + 0.587 * g + 0.114 * b


def _random_colour(rng: random.Random) -> Tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


class TextImages(torch.utils.data.Dataset):
    """Images of random strings (letters and digits) in random fonts and colours.

    Each image has a random background colour and one to three lines of two to eight
    characters, each line in its own random font, size and colour (kept at least 0.25 apart
    from the background in luminance, so the text is visible). Image ``i`` of a split depends
    only on ``(seed, split, i)`` and the font list.

    Args:
        split: ``"train"`` or ``"test"``; the two draw different images.
        resolution: height and width in pixels (the paper: 178).
        length: number of images in the split.
        seed: base seed.
        fonts: font file paths; default :func:`find_fonts`.

    Returns (``dataset[i]``):
        A float tensor ``(resolution, resolution, 3)`` with values in ``[0, 1]``.

    Example:
        >>> data = TextImages("test", resolution=32, length=4)
        >>> img = data[0]
        >>> img.shape, bool(img.min() >= 0 and img.max() <= 1)
        (torch.Size([32, 32, 3]), True)
    """

    def __init__(
        self,
        split: str = "train",
        *,
        resolution: int = 64,
        length: int = 10_000,
        seed: int = 0,
        fonts: Sequence[str] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {list(SPLITS)}, got {split!r}.")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16:
            raise ValueError(f"`resolution` must be an int >= 16, got {resolution!r}.")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"`length` must be an int >= 1, got {length!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}.")
        if fonts is None:
            fonts = find_fonts()
        else:
            fonts = tuple(fonts)
            if not fonts:
                raise ValueError("`fonts` must name at least one font file, got an empty list.")
            for path in fonts:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"`fonts` entry {path!r} is not a file.")
        self.split = split
        self.resolution = resolution
        self.length = length
        self.seed = seed
        self.fonts = tuple(fonts)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tensor:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"TextImages indices must be ints, got {type(index).__name__}.")
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} is out of range for {self.length} images.")
        index %= self.length
        # A str seed is hashed with SHA-512: the same on every run and platform.
        rng = random.Random(f"ncp-text:{self.seed}:{self.split}:{index}")
        return self._render(rng)

    def _render(self, rng: random.Random) -> Tensor:
        res = self.resolution
        background = _random_colour(rng)
        img = Image.new("RGB", (res, res), background)
        draw = ImageDraw.Draw(img)
        lines = rng.randint(1, 3)
        band = res / lines  # each line gets its own horizontal band
        for line in range(lines):
            text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 8)))
            path = rng.choice(self.fonts)
            size = max(6, round(band * rng.uniform(0.45, 0.9)))
            font = load_font(path, size)
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            if right - left > 0.95 * res:  # shrink to fit the width
                size = max(6, int(size * 0.95 * res / (right - left)))
                font = load_font(path, size)
                left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            x = rng.uniform(0, max(0.0, res - (right - left))) - left
            y0 = line * band
            y = y0 + rng.uniform(0, max(0.0, band - (bottom - top))) - top
            y = max(-top, min(y, res - bottom))  # keep the line inside the image
            colour = _random_colour(rng)
            while abs(_luminance(colour) - _luminance(background)) < 0.25:
                colour = _random_colour(rng)
            draw.text((x, y), text, fill=colour, font=font)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return data.view(res, res, 3).to(torch.float32) / 255.0

    def batch(self, indices: Sequence[int]) -> Tensor:
        """Images ``indices`` stacked into ``(len(indices), resolution, resolution, 3)``."""
        return torch.stack([self[i] for i in indices])
