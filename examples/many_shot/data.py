"""Class-labelled image sets for episodic training: mini-ImageNet and two offline stand-ins.

Every loader returns ``{split: ClassImages}`` with class-disjoint splits, each class holding a
``uint8`` array ``(images, channels, size, size)``; :mod:`.episodes` draws N-way K-shot tasks
from them.

- :func:`load_mini_imagenet`: the layout users have (Ravi & Larochelle, 2017): ``images/`` plus
  ``train.csv`` / ``val.csv`` / ``test.csv`` with ``filename,label`` rows (84x84 RGB).
- :func:`load_fashion_mnist`: Fashion-MNIST's IDX files (10 classes, 70,000 28x28 grey images);
  with 10 classes, class-disjoint splits allow 5 training and 5 test classes only.
- :func:`load_glyphs`: 62 character classes (``a-z``, ``A-Z``, ``0-9``) rendered from every usable
  font found, each rendering with its own small random affine transform and stroke width.

The stand-ins that need a Debian package (:data:`FONT_PACKAGES`, :data:`FASHION_PACKAGE`) are
fetched by :func:`fetch_debian` into a user cache folder (``$NCP_CACHE`` or ``~/.cache/ncp``) on
first use, never into the repository.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from examples.neural_fields.text_data import load_font, usable_fonts

SPLITS = ("train", "val", "test")
CHARACTERS = string.ascii_lowercase + string.ascii_uppercase + string.digits
FONT_PACKAGES = [
    "fonts-dejavu-core",
    "fonts-dejavu-extra",
    "fonts-liberation",
    "fonts-liberation2",
    "fonts-freefont-ttf",
    "fonts-urw-base35",
    "fonts-texgyre",
    "fonts-cmu",
    "fonts-crosextra-carlito",
    "fonts-crosextra-caladea",
    "fonts-open-sans",
    "fonts-roboto-unhinted",
    "fonts-lato",
    "fonts-linuxlibertine",
    "fonts-ebgaramond",
    "fonts-comic-neue",
    "fonts-humor-sans",
    "fonts-go",
    "fonts-hack",
    "fonts-inconsolata",
]
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# Fonts whose glyphs are symbols, small capitals (a == A up to size) or decorative swashes.
_EXCLUDED_FONTS = (
    "cmex",
    "cmsy",
    "cmmi",
    "STIXNonUni",
    "STIXSiz",
    "LastResort",
    "Symbol",
    "D050000L",
    "Math",
    "Smallcaps",
    "Z003",
    "Display",
)


@dataclass(frozen=True)
class ClassImages:
    """The images of one split, grouped by class.

    Attributes:
        name: the split's name (``"train"``, ``"val"`` or ``"test"``).
        classes: class names, one per entry of ``images``.
        images: per class, a ``uint8`` array ``(n, channels, size, size)``.
    """

    name: str
    classes: Tuple[str, ...]
    images: Tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.images):
            raise ValueError(
                f"split {self.name!r} has {len(self.classes)} class names but "
                f"{len(self.images)} image arrays."
            )
        shapes = {a.shape[1:] for a in self.images}
        if len(shapes) > 1:
            raise ValueError(f"split {self.name!r} mixes image shapes {sorted(shapes)}.")

    @property
    def min_per_class(self) -> int:
        """The smallest number of images any class has."""
        return min(len(a) for a in self.images)


def cache_dir() -> Path:
    """The user cache folder: ``$NCP_CACHE`` if set, else ``~/.cache/ncp``."""
    return Path(os.environ.get("NCP_CACHE") or Path.home() / ".cache" / "ncp")


def _to_array(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    img = img.convert("RGB" if channels == 3 else "L")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"`image_size` must be an int >= 16, got {image_size!r}.")


# ----------------------------------------------------------------------------- mini-ImageNet


def read_split_csv(path: Path) -> Dict[str, List[str]]:
    """``{label: [filename, ...]}`` from a Ravi-Larochelle csv (header ``filename,label``)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        got = rows[0] if rows else "an empty file"
        raise ValueError(
            f"{path} must start with the header 'filename,label', got {got!r}; use the "
            "Ravi & Larochelle split files (train.csv, val.csv, test.csv)."
        )
    by_label: Dict[str, List[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise ValueError(f"{path} line {line}: expected 'filename,label', got {row!r}.")
        by_label.setdefault(row[1].strip(), []).append(row[0].strip())
    if not by_label:
        raise ValueError(f"{path} has a header but no image rows.")
    return by_label


def load_mini_imagenet(
    root: str | os.PathLike, *, image_size: int = 84, splits: Sequence[str] = SPLITS
) -> Dict[str, ClassImages]:
    """Load mini-ImageNet from ``root/images/`` and ``root/{train,val,test}.csv``.

    Args:
        root: the folder holding ``images/`` and the csv files.
        image_size: side the images are resized to (the files are 84x84 RGB).
        splits: which splits to load.

    Returns:
        ``{split: ClassImages}`` with RGB arrays ``(n, 3, image_size, image_size)``.

    Raises:
        FileNotFoundError: when ``root``, ``images/``, a csv or an image is missing.
        ValueError: on a malformed csv, or a class that appears in two splits.
    """
    _check_size(image_size)
    root = Path(root)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise FileNotFoundError(
            f"`--data-root` {str(root)!r} has no images/ folder; point it at the mini-ImageNet "
            "folder that holds images/ and train.csv, val.csv, test.csv."
        )
    out: Dict[str, ClassImages] = {}
    owner: Dict[str, str] = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"`splits` entries must be in {list(SPLITS)}, got {split!r}.")
        csv_path = root / f"{split}.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(
                f"{csv_path} not found; mini-ImageNet needs the Ravi & Larochelle split files "
                "train.csv, val.csv and test.csv beside images/."
            )
        by_label = read_split_csv(csv_path)
        for label in by_label:
            if label in owner:
                raise ValueError(
                    f"class {label!r} is in both {owner[label]}.csv and {split}.csv; the splits "
                    "must be class-disjoint."
                )
            owner[label] = split
        arrays = []
        for label, names in tqdm(
            by_label.items(), desc=f"mini-ImageNet {split}", unit="class", leave=False
        ):
            batch = []
            for name in names:
                path = images_dir / name
                if not path.is_file():
                    raise FileNotFoundError(
                        f"{split}.csv lists {name!r} (class {label!r}) but {path} does not exist."
                    )
                with Image.open(path) as img:
                    batch.append(_to_array(img, image_size, 3))
            arrays.append(np.stack(batch))
        out[split] = ClassImages(split, tuple(by_label), tuple(arrays))
    return out


# ----------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes: images ``(n, rows, cols)`` or
    labels ``(n,)``.

    Raises:
        ValueError: when the file is not an IDX file of unsigned bytes, or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()!r}, expected "
            "'0000 08 nd'); pass Fashion-MNIST's *-idx3-ubyte.gz / *-idx1-ubyte.gz files."
        )
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} declares shape {dims} but holds {body.size} values.")
    return body.reshape(dims)


def load_fashion_mnist(
    folder: str | os.PathLike,
    *,
    image_size: int = 28,
    train_classes: int = 5,
    split_seed: int = 0,
    val_per_class: int = 0,
) -> Dict[str, ClassImages]:
    """Fashion-MNIST (all 70,000 images) split by class into ``train`` and ``test``.

    Args:
        folder: holds ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
            ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``.
        image_size: side the 28x28 images are resized to.
        train_classes: classes for meta-training; the other ``10 - train_classes`` are test
            classes. Five each allows 5-way episodes on both; there is no validation split.
        split_seed: seed of the class shuffle (and of the validation images).
        val_per_class: hold out this many images of every *training* class as a ``val`` split
            (image-disjoint from ``train``, not class-disjoint: ten classes are too few for a
            third class split). 0 gives no ``val`` split.

    Returns:
        ``{"train": ClassImages, "test": ClassImages}`` (and ``"val"`` when ``val_per_class``
        > 0), grey arrays ``(n, 1, size, size)``.
    """
    _check_size(image_size)
    if not 1 <= train_classes <= 9:
        raise ValueError(f"`train_classes` must be in [1, 9], got {train_classes!r}.")
    if isinstance(val_per_class, bool) or not isinstance(val_per_class, int) or val_per_class < 0:
        raise ValueError(f"`val_per_class` must be an int >= 0, got {val_per_class!r}.")
    folder = Path(folder)
    parts = []
    for prefix in ("train", "t10k"):
        img_path = folder / f"{prefix}-images-idx3-ubyte.gz"
        lab_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
        for p in (img_path, lab_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p} not found; pass the folder with Fashion-MNIST's four IDX .gz files, "
                    "or omit --data-root to fetch Debian's dataset-fashion-mnist into the cache."
                )
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{img_path} and {lab_path} must hold (n, rows, cols) images and (n,) labels, "
                f"got {images.shape} and {labels.shape}."
            )
        parts.append((images, labels))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if images.shape[1:] != (image_size, image_size):
        images = np.stack([_to_array(Image.fromarray(im), image_size, 1)[0] for im in images])
    rng = np.random.default_rng(split_seed)
    order = rng.permutation(10)
    splits = {"train": order[:train_classes], "test": order[train_classes:]}
    out = {
        name: ClassImages(
            name,
            tuple(FASHION_CLASSES[c] for c in cls),
            tuple(images[labels == c][:, None].copy() for c in cls),
        )
        for name, cls in splits.items()
    }
    if val_per_class:
        train = out["train"]
        if val_per_class >= train.min_per_class:
            raise ValueError(
                f"`val_per_class` must be below the {train.min_per_class} images of the smallest "
                f"training class, got {val_per_class}; hold out fewer images."
            )
        picks = [rng.permutation(len(a)) for a in train.images]
        out["val"] = ClassImages(
            "val",
            train.classes,
            tuple(a[p[:val_per_class]] for a, p in zip(train.images, picks, strict=True)),
        )
        out["train"] = ClassImages(
            "train",
            train.classes,
            tuple(a[p[val_per_class:]] for a, p in zip(train.images, picks, strict=True)),
        )
    return out


# ----------------------------------------------------------------------------- glyphs


def builtin_font_dirs() -> List[Path]:
    """Font folders present without any download: matplotlib's and the system's."""
    import matplotlib

    return [Path(matplotlib.get_data_path()) / "fonts" / "ttf", Path("/usr/share/fonts")]


def find_fonts(dirs: Sequence[str | os.PathLike]) -> Tuple[str, ...]:
    """Usable ``.ttf``/``.otf`` fonts under ``dirs`` (searched recursively), one per file name,
    sorted by file name; symbol, small-capital and swash fonts are left out, and so is any font
    that does not draw every character of :data:`CHARACTERS` distinctly.

    Raises:
        RuntimeError: when no usable font is found.
    """
    return usable_fonts(
        dirs,
        CHARACTERS,
        suffixes=(".ttf", ".otf"),
        excluded=_EXCLUDED_FONTS,
        recursive=True,
        size=32,
        hint='install matplotlib (pip install "ncp[examples]") or use --fonts debian.',
    )


def render_glyph(
    char: str, font_path: str, image_size: int, rng: np.random.Generator, *, augment: bool = True
) -> np.ndarray:
    """One white-on-black rendering ``(image_size, image_size)`` ``uint8`` of ``char``.

    The character is drawn at 4x resolution on a fixed baseline (so lower and upper case keep
    their relative size and position), then, with ``augment``, warped by a small random affine
    map (rotation within 10 degrees, shear within 0.15, scale 0.85-1.1, shift within 6 % of the
    side) and thickened by a random stroke of 0-2 pixels at the final scale, and box-filtered
    down to ``image_size``.
    """
    big = 4 * image_size
    stroke = int(rng.integers(0, 3)) * 2 if augment else 0
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).text(
        (big / 2, 0.74 * big),
        char,
        fill=255,
        font=load_font(font_path, int(0.62 * big)),
        anchor="ms",
        stroke_width=stroke,
        stroke_fill=255,
    )
    if augment:
        angle = np.deg2rad(rng.uniform(-10, 10))
        shear = rng.uniform(-0.15, 0.15)
        scale = rng.uniform(0.85, 1.1)
        shift = rng.uniform(-0.06, 0.06, size=2) * big
        # Inverse map (output -> input pixel) of: rotate, shear, scale about the centre, shift.
        c, s = np.cos(angle), np.sin(angle)
        forward = np.array([[c, -s + shear * c], [s, c + shear * s]]) * scale
        inv = np.linalg.inv(forward)
        centre = np.array([big / 2, big / 2])
        offset = centre - inv @ (centre + shift)
        coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
        canvas = canvas.transform(
            (big, big), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
        )
    return np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX), np.uint8)


def render_glyph_bank(
    fonts: Sequence[str],
    *,
    image_size: int,
    variants: int,
    seed: int = 0,
    characters: str = CHARACTERS,
    progress: bool = True,
) -> np.ndarray:
    """All renderings: ``uint8`` ``(characters, fonts * variants, 1, size, size)``.

    Rendering ``(c, f, v)`` depends only on ``(seed, c, f, v)``: the character's index ``c``, the
    font's index ``f`` in ``fonts`` and the variant ``v``, each with its own random warp.
    """
    _check_size(image_size)
    if isinstance(variants, bool) or not isinstance(variants, int) or variants < 1:
        raise ValueError(f"`variants` must be an int >= 1, got {variants!r}.")
    bank = np.zeros(
        (len(characters), len(fonts) * variants, 1, image_size, image_size), dtype=np.uint8
    )
    for c, ch in enumerate(tqdm(characters, desc="rendering glyphs", disable=not progress)):
        for f, font in enumerate(fonts):
            for v in range(variants):
                rng = np.random.default_rng((seed, c, f, v))
                bank[c, f * variants + v, 0] = render_glyph(ch, font, image_size, rng)
    return bank


def split_classes(n: int, counts: Tuple[int, int, int], seed: int) -> Dict[str, np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into train/val/test of ``counts`` sizes."""
    if sum(counts) != n or min(counts) < 0:
        raise ValueError(
            f"`split_counts` must be 3 non-negative ints summing to {n}, got {list(counts)}."
        )
    order = np.random.default_rng(seed).permutation(n)
    a, b = counts[0], counts[0] + counts[1]
    return {"train": order[:a], "val": order[a:b], "test": order[b:]}


def load_glyphs(
    *,
    image_size: int = 32,
    variants: int = 2,
    fonts: str = "debian",
    split_counts: Tuple[int, int, int] = (36, 12, 14),
    split_seed: int = 0,
    render_seed: int = 0,
    cache: Path | None = None,
    bank_file: str | os.PathLike | None = None,
) -> Dict[str, ClassImages]:
    """The glyph stand-in: 62 character classes split class-disjointly into train/val/test.

    Args:
        image_size: side of the renderings.
        variants: renderings per (character, font), each with its own random warp; the shots
            of a class are its fonts x variants.
        fonts: ``"builtin"`` (matplotlib's and system fonts, no download: about 40) or
            ``"debian"`` (adds the 20 Debian font packages of :data:`FONT_PACKAGES`, fetched into
            the cache on first use: about 230 usable fonts).
        split_counts: classes in train, val, test.
        split_seed: seed of the class split.
        render_seed: seed of the warps.
        cache: where the rendered bank is stored (``.npz``); default :func:`cache_dir`.
        bank_file: a bank ``.npz`` written earlier (``CACHE/glyphs/bank-*.npz``), used as is
            instead of finding fonts and rendering: to run on a machine without the fonts.

    Returns:
        ``{"train", "val", "test"}`` :class:`ClassImages` of grey arrays ``(n, 1, size, size)``.
    """
    parts = split_classes(len(CHARACTERS), split_counts, split_seed)
    if bank_file is not None:
        bank = np.load(bank_file)["bank"]
        want = (len(CHARACTERS), 1, image_size, image_size)
        if bank.ndim != 5 or (bank.shape[0], *bank.shape[2:]) != want:
            raise ValueError(
                f"`--data-root` {str(bank_file)!r} holds a bank of shape {bank.shape}, expected "
                f"(62, renderings, 1, {image_size}, {image_size}); render one with the same "
                "--image-size first."
            )
        return _glyph_splits(bank, parts)
    if fonts not in ("builtin", "debian"):
        raise ValueError(f"`--fonts` must be 'builtin' or 'debian', got {fonts!r}.")
    cache = cache_dir() if cache is None else cache
    dirs = builtin_font_dirs()
    if fonts == "debian":
        dirs.append(fetch_debian(FONT_PACKAGES, cache) / "usr" / "share" / "fonts")
    paths = find_fonts(dirs)
    key = hashlib.sha256(
        json.dumps(
            [[os.path.basename(p) for p in paths], image_size, variants, render_seed]
        ).encode()
    ).hexdigest()[:16]
    bank_path = cache / "glyphs" / f"bank-{image_size}px-{key}.npz"
    if bank_path.is_file():
        bank = np.load(bank_path)["bank"]
    else:
        bank = render_glyph_bank(paths, image_size=image_size, variants=variants, seed=render_seed)
        bank_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = bank_path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, bank=bank)
        os.replace(tmp, bank_path)
    return _glyph_splits(bank, parts)


def _glyph_splits(bank: np.ndarray, parts: Dict[str, np.ndarray]) -> Dict[str, ClassImages]:
    return {
        name: ClassImages(name, tuple(CHARACTERS[i] for i in idx), tuple(bank[i] for i in idx))
        for name, idx in parts.items()
        if len(idx)
    }


# ----------------------------------------------------------------------------- Debian cache


def fetch_debian(packages: Sequence[str], cache: Path) -> Path:
    """Download Debian packages with ``apt-get download`` and unpack them under
    ``cache/root`` (nothing is installed); returns ``cache/root``. Skips packages already
    unpacked (a marker file per package).

    Raises:
        RuntimeError: when ``apt-get``/``dpkg-deb`` are missing or a download fails, saying
            what to install or fetch by hand.
    """
    root = cache / "root"
    done = cache / "debs" / "unpacked"
    todo = [p for p in packages if not (done / p).is_file()]
    if not todo:
        return root
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"fetching {todo} needs `{tool}` (Debian/Ubuntu); on another system download "
                f"these packages by hand and unpack them under {root}."
            )
    print(
        f"ncp many-shot: fetching {len(todo)} Debian package(s) into {cache} (first use only; "
        "set NCP_CACHE to choose the folder)",
        file=sys.stderr,
    )
    apt = cache / "apt"
    (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    opts = [f"-oDir::State::Lists={apt / 'lists'}", f"-oDir::Cache={apt}"]

    def run(cmd: List[str], cwd: Path) -> None:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr[-800:]}")

    if not any((apt / "lists").glob("*Packages*")):
        run(["apt-get", *opts, "update"], apt)
    run(["apt-get", *opts, "download", *todo], debs)
    done.mkdir(parents=True, exist_ok=True)
    for pkg in todo:
        matches = sorted(debs.glob(f"{pkg}_*.deb"))
        if not matches:
            raise RuntimeError(f"`apt-get download {pkg}` left no {pkg}_*.deb in {debs}.")
        run(["dpkg-deb", "-x", str(matches[-1]), str(root)], debs)
        (done / pkg).touch()
    return root


def fashion_folder(cache: Path | None = None) -> Path:
    """Fashion-MNIST's IDX folder from Debian's ``dataset-fashion-mnist``, fetched on first use."""
    root = fetch_debian([FASHION_PACKAGE], cache_dir() if cache is None else cache)
    return root / "usr" / "share" / "datasets" / "fashion-mnist"
