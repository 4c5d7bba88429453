"""Coordinates and context sets of examples/neural_fields/signals.py, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from examples.neural_fields import signals


def test_grid_is_row_major_with_ends_at_the_bound():
    g = signals.grid((2, 3), bound=2.0)
    expected = torch.tensor(
        [[-2.0, -2.0], [-2.0, 0.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 0.0], [2.0, 2.0]]
    )
    torch.testing.assert_close(g, expected)


def test_audio_coordinates_span_minus_50_to_50():
    waves = torch.zeros(2, 16_000)  # one second at 16 kHz
    x, y = signals.audio_context(waves)
    assert x.shape == (2, 16_000, 1) and y.shape == (2, 16_000, 1)
    assert x[0, 0, 0].item() == -50.0 and x[0, -1, 0].item() == 50.0
    torch.testing.assert_close(x[1, 1, 0] - x[1, 0, 0], torch.tensor(100.0 / 15_999))
    # five samples: -50, -25, 0, 25, 50
    x5, _ = signals.audio_context(torch.arange(5.0).unsqueeze(0))
    torch.testing.assert_close(x5[0, :, 0], torch.tensor([-50.0, -25.0, 0.0, 25.0, 50.0]))
    # a 64 ms clip with the paper's spacing (1 s <-> [-50, 50]) spans [-3.2, 3.2]
    short, _ = signals.audio_context(torch.zeros(1, 1024), bound=50 * 0.064)
    torch.testing.assert_close(short[0, [0, -1], 0], torch.tensor([-3.2, 3.2]))


def test_video_coordinates_frame_row_column():
    videos = torch.arange(2 * 3 * 2 * 4 * 3, dtype=torch.float32).reshape(2, 3, 2, 4, 3)
    x, y = signals.video_context(videos)
    assert x.shape == (2, 24, 3) and y.shape == (2, 24, 3)
    # point (f=1, r=1, c=2) is number 1*8 + 1*4 + 2 = 14
    torch.testing.assert_close(x[0, 14], torch.tensor([0.0, 1.0, 1.0 / 3.0]))
    torch.testing.assert_close(y[1, 14], videos[1, 1, 1, 2])
    torch.testing.assert_close(x[0, 0], torch.tensor([-1.0, -1.0, -1.0]))
    torch.testing.assert_close(x[0, -1], torch.tensor([1.0, 1.0, 1.0]))


def test_image_context_order():
    images = torch.rand(1, 3, 4, 3)
    x, y = signals.image_context(images)
    torch.testing.assert_close(x[0, 6], torch.tensor([0.0, 1.0 / 3.0]))  # pixel (1, 2)
    torch.testing.assert_close(y[0, 6], images[0, 1, 2])


def test_sphere_coordinates_by_hand():
    lat = torch.tensor([-90.0, 0.0, 30.0, 90.0], dtype=torch.float64)
    lon = torch.tensor([0.0, 90.0, 180.0], dtype=torch.float64)
    xyz = signals.sphere_coordinates(lat, lon).reshape(4, 3, 3)
    torch.testing.assert_close(xyz[1, 0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(xyz[1, 1], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(xyz[1, 2], torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(xyz[3, 1], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(xyz[0, 2], torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64))
    half = math.sqrt(3) / 2  # cos 30
    torch.testing.assert_close(xyz[2, 0], torch.tensor([half, 0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(xyz.norm(dim=-1), torch.ones(4, 3, dtype=torch.float64))


def test_equal_angle_grid_matches_era5_spacing():
    lat, lon = signals.equal_angle_grid(181, 360)  # ERA5 at 1 degree
    assert lat[0].item() == -90.0 and lat[-1].item() == 90.0 and lat[1].item() == -89.0
    assert lon[0].item() == 0.0 and lon[-1].item() == 359.0


def test_sphere_context_shapes_and_values():
    lat, lon = signals.equal_angle_grid(3, 4)
    fields = torch.rand(2, 3, 4, 1)
    x, y = signals.sphere_context(fields, lat, lon)
    assert x.shape == (2, 12, 3) and y.shape == (2, 12, 1)
    torch.testing.assert_close(y[1, 5], fields[1, 1, 1])
    torch.testing.assert_close(x[0, 5], torch.tensor([0.0, 1.0, 0.0]))  # equator, lon 90
    with pytest.raises(ValueError, match="pass the coordinates of this grid"):
        signals.sphere_context(fields, lat[:2], lon)


@pytest.mark.parametrize(
    ("fn", "bad", "match"),
    [
        (signals.image_context, torch.zeros(4, 4, 3), r"\(tasks, height, width, channels\)"),
        (signals.audio_context, torch.zeros(10), r"\(tasks, samples\)"),
        (signals.video_context, torch.zeros(2, 4, 4, 3), r"\(tasks, frames"),
    ],
)
def test_contexts_reject_a_missing_task_dimension(fn, bad, match):
    with pytest.raises(ValueError, match=match):
        fn(bad)


def test_grid_and_sphere_reject_bad_arguments():
    with pytest.raises(ValueError, match="ints >= 2"):
        signals.grid((1, 4))
    with pytest.raises(ValueError, match="`bound` must be > 0"):
        signals.grid((2,), bound=0.0)
    with pytest.raises(ValueError, match=r"\[-90, 90\]"):
        signals.sphere_coordinates(torch.tensor([95.0]), torch.tensor([0.0]))


def test_contexts_follow_dtype():
    x, _ = signals.image_context(torch.zeros(1, 2, 2, 3, dtype=torch.float64))
    assert x.dtype == torch.float64
