"""The main demo (examples/demo.py) end to end in smoke mode, and its Text data helpers."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip(
    "matplotlib", reason="the demo needs the examples extra: pip install -e '.[examples]'"
)

from examples import demo
from examples.neural_fields.text_data import (
    TextImages,
    find_fonts,
    grid_coordinates,
    image_context,
    psnr,
)


def test_demo_smoke_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    results = demo.main(["--smoke", "--out", str(out)])

    assert set(results["methods"]) == {"MAML", "GradNCP"}
    for name, m in results["methods"].items():
        assert m["peak_saved_bytes"] > 0, name
        assert m["seconds_per_step"] > 0, name
        assert len(m["losses"]) == demo.SMOKE["outer_steps"]
        assert all(math.isfinite(v) for v in m["losses"]), name
        pairs = zip(m["query_losses"], m["losses"], strict=True)
        assert all(0 < q <= v for q, v in pairs), name  # the bootstrap term is >= 0
    assert results["methods"]["MAML"]["inner_steps"] == 4
    assert results["methods"]["GradNCP"]["inner_steps"] == 16
    assert results["methods"]["GradNCP"]["ratio"] == 0.25
    assert set(results["psnr"]) == {"no meta-learning", "MAML", "GradNCP", "GradNCP + rescale"}
    assert all(math.isfinite(v) and v > 0 for v in results["psnr"].values())

    figure = out / "demo.png"
    assert results["figure"] == str(figure)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "results.json").is_file()
    printed = capsys.readouterr().out
    assert "GradNCP + grad rescaling" in printed and str(figure) in printed


def test_demo_rejects_bad_flags():
    with pytest.raises(SystemExit):
        demo.main(["--outer-steps", "0"])


def test_progress_fallback_prints_about_ten_lines(capsys):
    assert list(demo._print_progress(range(25), "MAML")) == list(range(25))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "  MAML: step 1/25" and lines[-1] == "  MAML: step 25/25"
    assert len(lines) == 13  # steps 1, 3, ..., 25: every 2nd step


def test_kept_points_match_meta_step_shapes():
    torch.manual_seed(0)
    model = demo.Siren(hidden=16, layers=3)
    images = TextImages("test", resolution=16, length=2).batch([0, 1])
    kept = demo.kept_points(model, demo.method_configs()["GradNCP"], images)
    assert kept.shape == (16, 2, 64)  # K=16 steps, 2 images, 25 % of 256 pixels
    assert int(kept.min()) >= 0 and int(kept.max()) < 256


def test_text_images_are_deterministic_per_index():
    a = TextImages("train", resolution=24, seed=3)
    b = TextImages("train", resolution=24, seed=3)
    torch.testing.assert_close(a[5], b[5], rtol=0, atol=0)
    torch.testing.assert_close(a[5], a[5], rtol=0, atol=0)
    assert not torch.equal(a[5], a[6])
    assert not torch.equal(a[5], TextImages("train", resolution=24, seed=4)[5])


def test_text_images_shape_range_and_length():
    data = TextImages("test", resolution=20, length=3)
    assert len(data) == 3
    img = data[0]
    assert img.shape == (20, 20, 3) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    # text over a plain background: more than one colour in every image
    assert all(torch.unique(data[i].reshape(-1, 3), dim=0).shape[0] > 2 for i in range(3))
    torch.testing.assert_close(data[-1], data[2], rtol=0, atol=0)
    assert data.batch([0, 2]).shape == (2, 20, 20, 3)
    with pytest.raises(IndexError, match="out of range"):
        data[3]


def test_train_and_test_splits_differ():
    train = TextImages("train", resolution=24, length=8)
    test = TextImages("test", resolution=24, length=8)
    for i in range(8):
        assert not torch.equal(train[i], test[i])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"split": "val"}, ValueError, "`split` must be one of"),
        ({"resolution": 8}, ValueError, "`resolution` must be an int >= 16"),
        ({"resolution": 32.0}, ValueError, "`resolution` must be an int"),
        ({"length": 0}, ValueError, "`length` must be an int >= 1"),
        ({"fonts": []}, ValueError, "at least one font"),
        ({"fonts": ["/no/such/font.ttf"]}, FileNotFoundError, "is not a file"),
    ],
)
def test_text_images_reject_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        TextImages(**kwargs)


def test_find_fonts_keeps_latin_fonts_only():
    fonts = find_fonts()
    names = [f.rsplit("/", 1)[-1] for f in fonts]
    assert "DejaVuSans.ttf" in names
    assert not any(bad in n for n in names for bad in ("cmsy", "cmex", "LastResort", "STIXSiz"))
    assert len(names) == len(set(names))


def test_grid_coordinates_corners_by_hand():
    coords = grid_coordinates(3, 4)
    assert coords.shape == (12, 2)
    torch.testing.assert_close(coords[0], torch.tensor([-1.0, -1.0]))  # top-left
    torch.testing.assert_close(coords[3], torch.tensor([-1.0, 1.0]))  # top-right
    torch.testing.assert_close(coords[8], torch.tensor([1.0, -1.0]))  # bottom-left
    torch.testing.assert_close(coords[11], torch.tensor([1.0, 1.0]))  # bottom-right
    torch.testing.assert_close(coords[5], torch.tensor([0.0, -1.0 / 3.0]))  # row 1, column 1


def test_image_context_shapes_and_order():
    images = torch.arange(2 * 3 * 4 * 3, dtype=torch.float32).reshape(2, 3, 4, 3)
    x, y = image_context(images)
    assert x.shape == (2, 12, 2) and y.shape == (2, 12, 3)
    torch.testing.assert_close(x[1], grid_coordinates(3, 4))
    torch.testing.assert_close(y[1, 4 * 2 + 3], images[1, 2, 3])  # pixel (2, 3) is point 11
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        image_context(images[0])


def test_psnr_by_hand():
    target = torch.zeros(2, 2, 2, 3)
    pred = torch.zeros(2, 2, 2, 3)
    pred[0] = 0.1  # mse 0.01 -> 20 dB
    pred[1, 0, 0, 0] = 1.0  # mse 1/12 -> 10*log10(12) = 10.7918 dB
    torch.testing.assert_close(psnr(pred, target), torch.tensor([20.0, 10.0 * math.log10(12)]))
    with pytest.raises(ValueError, match="same shape"):
        psnr(pred, target[:1])


def test_busy_note_flags_a_shared_cpu_only(monkeypatch):
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    quiet = {"methods": {"MAML": {"load_average": 1.9}, "GradNCP": {"load_average": 2.2}}}
    assert demo.busy_note(quiet) is None
    busy = {"methods": {"MAML": {"load_average": 2.1}, "GradNCP": {"load_average": 4.3}}}
    note = demo.busy_note(busy)
    assert note is not None and "GradNCP 4.3" in note and "not a fair comparison" in note


def test_default_threads_are_the_cores_free_at_start(monkeypatch):
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 4)
    for load, free in ((0.3, 4), (1.6, 2), (3.9, 1), (9.0, 1)):
        monkeypatch.setattr(demo, "_load_average", lambda load=load: load)
        assert demo.free_cores() == free
