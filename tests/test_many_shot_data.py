"""Loaders, glyph renderer and episode sampler of examples/many_shot (on generated data)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from examples.many_shot import data
from examples.many_shot.episodes import EpisodeSampler, shuffle_support

pytestmark = pytest.mark.usefixtures("one_thread")


def write_mini_imagenet(root: Path, size: int = 16, per_class: int = 3) -> dict:
    """A mini-ImageNet folder in the Ravi-Larochelle layout: PNGs and JPEGs, three csvs."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    classes = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07", "n08"]}
    pixels = {}
    for split, labels in classes.items():
        rows = ["filename,label"]
        for label in labels:
            for i in range(per_class):
                ext = "png" if i % 2 == 0 else "jpg"
                name = f"{label}{i:08d}.{ext}"
                # Smooth images (a colour plus a ramp), so that JPEG stays close to them.
                ramp = np.linspace(0, 60, size)[None, :, None]
                arr = (rng.integers(0, 190, 3)[None, None] + ramp + 0 * ramp.T).astype(np.uint8)
                arr = np.ascontiguousarray(np.broadcast_to(arr, (size, size, 3)))
                Image.fromarray(arr).save(root / "images" / name)
                pixels[name] = arr
                rows.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return pixels


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion(folder: Path, per_class: tuple = (12, 3)) -> None:
    """Fashion-MNIST's four files, ``per_class`` images of each of 10 classes (train, t10k)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, n in zip(("train", "t10k"), per_class, strict=True):
        labels = np.repeat(np.arange(10), n)
        rng.shuffle(labels)
        # Each class gets its own brightness so that images can be traced back to labels.
        images = (labels[:, None, None] * 20 + rng.integers(0, 10, (len(labels), 28, 28))).astype(
            np.uint8
        )
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


def test_mini_imagenet_loader_reads_the_ravi_larochelle_layout(tmp_path):
    pixels = write_mini_imagenet(tmp_path)
    splits = data.load_mini_imagenet(tmp_path, image_size=16)
    assert set(splits) == {"train", "val", "test"}
    assert splits["train"].classes == ("n01", "n02", "n03")
    assert splits["val"].classes == ("n04", "n05")
    names = [set(s.classes) for s in splits.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    first = splits["test"].images[0]
    assert first.shape == (3, 3, 16, 16) and first.dtype == np.uint8
    # PNG is lossless: the first image of class n06 is exactly what was written.
    np.testing.assert_array_equal(first[0], pixels["n0600000000.png"].transpose(2, 0, 1))
    # JPEG is lossy but close.
    jpg = first[1].astype(int) - pixels["n0600000001.jpg"].transpose(2, 0, 1)
    assert np.abs(jpg).mean() < 8
    resized = data.load_mini_imagenet(tmp_path, image_size=20, splits=("val",))
    assert set(resized) == {"val"} and resized["val"].images[0].shape == (3, 3, 20, 20)


def test_mini_imagenet_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images/ folder"):
        data.load_mini_imagenet(tmp_path)
    write_mini_imagenet(tmp_path)
    (tmp_path / "val.csv").write_text("file,class\na.png,n04\n")
    with pytest.raises(ValueError, match="header 'filename,label'"):
        data.load_mini_imagenet(tmp_path, image_size=16)
    (tmp_path / "val.csv").write_text("filename,label\nmissing.jpg,n04\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        data.load_mini_imagenet(tmp_path, image_size=16)
    (tmp_path / "val.csv").write_text("filename,label\nn0100000000.png,n01\n")
    with pytest.raises(ValueError, match="class-disjoint"):
        data.load_mini_imagenet(tmp_path, image_size=16)
    with pytest.raises(ValueError, match="image_size"):
        data.load_mini_imagenet(tmp_path, image_size=8)


def test_read_idx_round_trip_and_bad_magic(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x.gz"), arr)
    (tmp_path / "raw").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "raw"), [7, 8, 9])
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1]))
    with pytest.raises(ValueError, match="declares shape"):
        data.read_idx(tmp_path / "short")


def test_fashion_mnist_loader_splits_classes(tmp_path):
    write_fashion(tmp_path)
    splits = data.load_fashion_mnist(tmp_path, image_size=28, split_seed=3)
    assert set(splits) == {"train", "test"}
    train, test = splits["train"], splits["test"]
    assert len(train.classes) == len(test.classes) == 5
    assert not set(train.classes) & set(test.classes)
    assert set(train.classes) | set(test.classes) == set(data.FASHION_CLASSES)
    for split in (train, test):
        for name, images in zip(split.classes, split.images, strict=True):
            assert images.shape == (15, 1, 28, 28)  # 12 train + 3 t10k images, all used
            label = data.FASHION_CLASSES.index(name)
            assert np.all(images // 20 == label)  # every image belongs to its class
    again = data.load_fashion_mnist(tmp_path, image_size=16, split_seed=3)
    assert again["train"].classes == train.classes
    assert again["train"].images[0].shape == (15, 1, 16, 16)
    other = data.load_fashion_mnist(tmp_path, split_seed=4)
    assert other["train"].classes != train.classes
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz"):
        data.load_fashion_mnist(tmp_path / "nowhere")
    held = data.load_fashion_mnist(tmp_path, split_seed=3, val_per_class=5)
    assert held["val"].classes == held["train"].classes == train.classes
    assert held["test"].classes == test.classes
    for full, tr, va in zip(train.images, held["train"].images, held["val"].images, strict=True):
        assert len(tr) == 10 and len(va) == 5
        rows = {im.tobytes() for im in full}
        assert {im.tobytes() for im in tr} | {im.tobytes() for im in va} <= rows
        assert not {im.tobytes() for im in tr} & {im.tobytes() for im in va}  # image-disjoint
    with pytest.raises(ValueError, match="`val_per_class` must be below the 15 images"):
        data.load_fashion_mnist(tmp_path, val_per_class=15)


@pytest.fixture(scope="module")
def fonts():
    found = data.find_fonts(data.builtin_font_dirs())
    assert found, "matplotlib ships fonts"
    return found[:2]


def test_glyph_renderer_shape_range_and_determinism(fonts):
    a = data.render_glyph("a", fonts[0], 16, np.random.default_rng(0))
    assert a.shape == (16, 16) and a.dtype == np.uint8
    assert a.max() > 128 and a.min() == 0  # ink on a black background
    np.testing.assert_array_equal(a, data.render_glyph("a", fonts[0], 16, np.random.default_rng(0)))
    b = data.render_glyph("a", fonts[0], 16, np.random.default_rng(1))
    assert not np.array_equal(a, b)  # another warp: real variation between shots


def test_glyph_bank_classes_are_distinct(fonts):
    bank = data.render_glyph_bank(
        fonts, image_size=16, variants=3, characters="aoL1", progress=False
    )
    assert bank.shape == (4, len(fonts) * 3, 1, 16, 16)
    again = data.render_glyph_bank(
        fonts, image_size=16, variants=3, characters="aoL1", progress=False
    )
    np.testing.assert_array_equal(bank, again)
    flat = bank.reshape(4, -1, 256).astype(float)
    means = flat.mean(1)
    within = np.mean([np.linalg.norm(flat[c] - means[c], axis=1).mean() for c in range(4)])
    between = np.mean([np.linalg.norm(means[i] - means[j]) for i in range(4) for j in range(i)])
    # Renderings of different characters differ (no two classes identical)...
    assert all(not np.array_equal(bank[i], bank[j]) for i in range(4) for j in range(i))
    # ...and every rendering of a class is distinct (fonts x warps).
    assert len({r.tobytes() for r in bank[0]}) == bank.shape[1]
    assert between > 0.3 * within


def test_glyph_bank_file_gives_class_disjoint_splits(tmp_path):
    bank = np.random.default_rng(0).integers(0, 255, (62, 4, 1, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "bank.npz", bank=bank)
    splits = data.load_glyphs(image_size=16, bank_file=tmp_path / "bank.npz")
    sizes = {k: len(v.classes) for k, v in splits.items()}
    assert sizes == {"train": 36, "val": 12, "test": 14}
    all_classes = [c for s in splits.values() for c in s.classes]
    assert sorted(all_classes) == sorted(data.CHARACTERS)
    idx = data.CHARACTERS.index(splits["test"].classes[0])
    np.testing.assert_array_equal(splits["test"].images[0], bank[idx])
    with pytest.raises(ValueError, match="expected \\(62, renderings, 1, 32, 32\\)"):
        data.load_glyphs(image_size=32, bank_file=tmp_path / "bank.npz")
    with pytest.raises(ValueError, match="split_counts"):
        data.split_classes(62, (30, 10, 10), 0)


def _split(classes: int = 6, per_class: int = 10) -> data.ClassImages:
    # Image j of class c is filled with the value 10 * c + j: traceable after sampling.
    images = tuple(
        (10 * c + np.arange(per_class, dtype=np.uint8))[:, None, None, None]
        * np.ones((1, 1, 16, 16), np.uint8)
        for c in range(classes)
    )
    return data.ClassImages("train", tuple(f"c{c}" for c in range(classes)), images)


def test_sampler_counts_labels_and_no_overlap():
    split = _split()
    ep = EpisodeSampler(split, ways=3, shots=4, queries=2, seed=0).sample(5)
    assert ep.support_x.shape == (5, 12, 1, 16, 16) and ep.query_x.shape == (5, 6, 1, 16, 16)
    assert ep.support_y.dtype == torch.int64
    for t in range(5):
        assert torch.bincount(ep.support_y[t], minlength=3).tolist() == [4, 4, 4]
        assert torch.bincount(ep.query_y[t], minlength=3).tolist() == [2, 2, 2]
        assert len(set(ep.classes[t].tolist())) == 3
        # Pixel value identifies (class, image): decode and check labels and disjointness.
        pix = lambda x: torch.round((x[:, 0, 0, 0] * 0.5 + 0.5) * 255).long()  # noqa: E731
        sup, qry = pix(ep.support_x[t]), pix(ep.query_x[t])
        assert set(sup.tolist()).isdisjoint(qry.tolist())
        assert len(set(sup.tolist())) == 12
        expected_cls = torch.as_tensor(ep.classes[t])[ep.support_y[t]]
        assert torch.equal(sup // 10, expected_cls)
        assert torch.equal(qry // 10, torch.as_tensor(ep.classes[t])[ep.query_y[t]])


def test_shuffle_support_keeps_image_label_pairs_and_mixes_the_order():
    ep = EpisodeSampler(_split(), ways=3, shots=6, queries=2, seed=0).sample(2)
    out = shuffle_support(ep, torch.Generator().manual_seed(0))
    assert torch.equal(out.query_x, ep.query_x) and torch.equal(out.query_y, ep.query_y)
    assert not torch.equal(out.support_y, ep.support_y)  # no longer sorted by label
    for t in range(2):
        assert sorted(out.support_y[t].tolist()) == ep.support_y[t].tolist()
        pairs = {
            (x.sum().item(), y.item())
            for x, y in zip(out.support_x[t], out.support_y[t], strict=True)
        }
        assert pairs == {
            (x.sum().item(), y.item())
            for x, y in zip(ep.support_x[t], ep.support_y[t], strict=True)
        }


def test_sampler_is_seeded_and_resumable():
    split = _split()
    a = EpisodeSampler(split, 3, 2, 2, seed=7)
    b = EpisodeSampler(split, 3, 2, 2, seed=7)
    c = EpisodeSampler(split, 3, 2, 2, seed=8)
    ea, eb, ec = a.sample(4), b.sample(4), c.sample(4)
    assert torch.equal(ea.support_x, eb.support_x) and np.array_equal(ea.images, eb.images)
    assert not np.array_equal(ea.images, ec.images)
    state = a.state_dict()
    nxt = a.sample(2)
    fresh = EpisodeSampler(split, 3, 2, 2, seed=0)
    fresh.load_state_dict(state)
    assert np.array_equal(fresh.sample(2).images, nxt.images)


def test_sampler_rejects_impossible_episodes():
    split = _split(classes=4, per_class=5)
    with pytest.raises(ValueError, match="`ways`=5 needs at least 5 classes"):
        EpisodeSampler(split, 5, 1, 1, seed=0)
    with pytest.raises(ValueError, match="`shots`\\+`queries`=6"):
        EpisodeSampler(split, 2, 5, 1, seed=0)
    with pytest.raises(ValueError, match="`shots` must be a positive int, got 0"):
        EpisodeSampler(split, 2, 0, 1, seed=0)


def test_load_glyphs_renders_builtin_fonts_once_into_the_cache(tmp_path):
    splits = data.load_glyphs(image_size=16, variants=1, fonts="builtin", cache=tmp_path)
    banks = list((tmp_path / "glyphs").glob("bank-16px-*.npz"))
    assert len(banks) == 1  # rendered once, stored in the cache given (never the repo)
    fonts = len(data.find_fonts(data.builtin_font_dirs()))
    assert splits["train"].images[0].shape == (fonts, 1, 16, 16)
    again = data.load_glyphs(image_size=16, variants=1, fonts="builtin", cache=tmp_path)
    np.testing.assert_array_equal(again["test"].images[3], splits["test"].images[3])
    from_file = data.load_glyphs(image_size=16, bank_file=banks[0])
    assert from_file["val"].classes == splits["val"].classes
    with pytest.raises(ValueError, match="`--fonts` must be 'builtin' or 'debian'"):
        data.load_glyphs(fonts="system", cache=tmp_path)
