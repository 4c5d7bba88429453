"""Loaders of examples/neural_fields on small generated files in the real formats: an image
folder, wav/flac, an .avi video, netCDF and npz grids; and the stand-in cache logic."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

pytest.importorskip("PIL", reason="the loaders need the examples extra")
pytest.importorskip("soundfile", reason="the loaders need the examples extra")

import soundfile
from PIL import Image

from examples.neural_fields import data, datasets, standins


def _bands(path, size=(40, 20)):
    """A wide image: red left quarter, green middle half, blue right quarter."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 4] = (255, 0, 0)
    arr[:, w // 4 : 3 * w // 4] = (0, 255, 0)
    arr[:, 3 * w // 4 :] = (0, 0, 255)
    Image.fromarray(arr).save(path)


def test_load_images_centre_crops_and_resizes(tmp_path):
    _bands(tmp_path / "a.png")
    sub = tmp_path / "sub"
    sub.mkdir()
    Image.new("RGB", (30, 30), (255, 255, 255)).save(sub / "b.jpg", quality=95)
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    pal.info["transparency"] = b"\x00"  # palette transparency: converted without a warning
    pal.save(tmp_path / "c.png", transparency=b"\x00")
    (tmp_path / "notes.txt").write_text("not an image")

    images = data.load_images(str(tmp_path), 8)
    assert images.shape == (3, 8, 8, 3) and images.dtype == torch.float32
    # a.png: the centre 20x20 square is the green band only
    torch.testing.assert_close(images[0], torch.tensor([0.0, 1.0, 0.0]).expand(8, 8, 3))
    assert images[2].max() <= 1 and images[2].min() >= 0
    assert data.load_images(str(tmp_path), 8, limit=1).shape == (1, 8, 8, 3)


def test_load_images_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        data.load_images(str(tmp_path / "missing"), 8)
    with pytest.raises(FileNotFoundError, match="no images"):
        data.load_images(str(tmp_path), 8)
    with pytest.raises(ValueError, match="`resolution` must be an int >= 2"):
        data.load_images(str(tmp_path), 1)


def test_load_audio_resamples_cuts_and_counts_the_rest(tmp_path):
    t22 = np.arange(11_025) / 22_050  # 0.5 s at 22.05 kHz
    soundfile.write(tmp_path / "a.wav", 0.5 * np.sin(2 * np.pi * 440 * t22), 22_050)
    t16 = np.arange(4_800) / 16_000  # 0.3 s at 16 kHz, stereo
    left = 0.4 * np.sin(2 * np.pi * 220 * t16)
    soundfile.write(tmp_path / "b.flac", np.stack([left, 0.5 * left], axis=1), 16_000)

    clips = data.load_audio(str(tmp_path), seconds=0.12)
    # a.wav -> 8,000 samples at 16 kHz: 4 clips of 1,920 and 320 left; b.flac: 2 clips, 960 left
    assert clips.data.shape == (6, 1920)
    assert clips.sources.tolist() == [0, 0, 0, 0, 1, 1]
    assert clips.dropped == 320 + 960
    # stereo is averaged: 0.75 of the left channel (flac is 16-bit: tolerance 1e-4)
    torch.testing.assert_close(
        clips.data[4], torch.from_numpy(0.75 * left[:1920]).float(), atol=1e-4, rtol=0
    )
    # resampling keeps the 440 Hz tone's amplitude
    assert clips.data[1].abs().max().item() == pytest.approx(0.5, abs=0.01)
    assert float(clips.data.abs().max()) <= 1.0
    assert data.load_audio(str(tmp_path), seconds=0.12, limit=3).data.shape == (3, 1920)
    with pytest.raises(ValueError, match="`seconds` must be > 0"):
        data.load_audio(str(tmp_path), seconds=0)
    with pytest.raises(ValueError, match=r"at least 2\.0 s long"):
        data.load_audio(str(tmp_path), seconds=2.0)


def _write_video(path, frames=10, w=32, h=24):
    av = pytest.importorskip("av", reason="the video loader needs the examples extra")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            arr = np.full((h, w, 3), 20 * i + 30, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_load_videos_cuts_clips_of_frames(tmp_path):
    _write_video(tmp_path / "v.avi")
    clips = data.load_videos(str(tmp_path), frames=4, resolution=8)
    assert clips.data.shape == (2, 4, 8, 8, 3)
    assert clips.dropped == 2  # 10 frames: two clips of 4, 2 left
    # grey levels 30, 50, 70, ... survive the lossy codec to within a few levels
    means = clips.data.mean(dim=(2, 3, 4)).flatten() * 255
    torch.testing.assert_close(
        means, torch.tensor([30.0, 50, 70, 90, 110, 130, 150, 170]), atol=4, rtol=0
    )
    strided = data.load_videos(str(tmp_path), frames=4, resolution=8, stride=2)
    assert strided.data.shape == (1, 4, 8, 8, 3) and strided.dropped == 1
    with pytest.raises(ValueError, match="has 16 frames"):
        data.load_videos(str(tmp_path), frames=16, resolution=8)


def _write_netcdf(path, values, missing=-1e34):
    from scipy.io import netcdf_file

    with netcdf_file(str(path), "w") as f:
        f.createDimension("TIME", values.shape[0])
        f.createDimension("LAT", values.shape[1])
        f.createDimension("LON", values.shape[2])
        lat = f.createVariable("LAT", "f4", ("LAT",))
        lat[:] = np.linspace(60, -60, values.shape[1])  # decreasing, as many files store it
        lon = f.createVariable("LON", "f4", ("LON",))
        lon[:] = np.arange(values.shape[2]) * 90.0
        var = f.createVariable("T2M", "f4", ("TIME", "LAT", "LON"))
        var.missing_value = np.float32(missing)
        var[:] = values


def test_load_grid_netcdf_sorts_latitude_and_marks_missing(tmp_path):
    values = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    values[1, 0, 2] = -1e34
    _write_netcdf(tmp_path / "t.nc", values)
    grid = data.load_grid(str(tmp_path / "t.nc"), "T2M")
    assert grid.fields.shape == (2, 3, 4, 1)
    torch.testing.assert_close(grid.lat, torch.tensor([-60.0, 0.0, 60.0], dtype=torch.float64))
    # latitude flipped: row 0 is the file's last row
    torch.testing.assert_close(grid.fields[0, 0, :, 0], torch.tensor(values[0, 2]))
    assert grid.valid.sum().item() == 11 and not grid.valid[2, 2]
    with pytest.raises(KeyError, match="'SST' is not in"):
        data.load_grid(str(tmp_path / "t.nc"), "SST")


def test_load_grid_npz_and_normalise(tmp_path):
    lat, lon = np.array([-45.0, 45.0]), np.array([0.0, 120.0, 240.0])
    field = np.array([[[1.0, 2.0, 3.0], [4.0, np.nan, 6.0]]])
    np.savez(tmp_path / "g.npz", lat=lat, lon=lon, z=field)
    grid = data.load_grid(str(tmp_path / "g.npz"), "z")
    assert grid.valid.tolist() == [[True, True, True], [True, False, True]]
    scaled, low, high = data.normalise(grid.fields, grid.valid)
    assert (low, high) == (1.0, 6.0)
    torch.testing.assert_close(scaled[0, 1, 2, 0], torch.tensor(1.0))
    with pytest.raises(ValueError, match="must end with one of"):
        (tmp_path / "g.txt").write_text("")
        data.load_grid(str(tmp_path / "g.txt"), "z")


def test_build_folder_datasets_split_and_context(tmp_path):
    for i in range(10):
        Image.new("RGB", (20, 20), (i * 20, 0, 0)).save(tmp_path / f"{i:02d}.png")
    images = datasets.build("image_folder", root=str(tmp_path), resolution=16)
    assert images.kind == "image" and images.n_train == 9 and len(images.test) == 1
    torch.testing.assert_close(images.test[0, 0, 0, 0], torch.tensor(180 / 255))  # the 10th
    x, y = images.context(images.train_batch([0, 1]))
    assert x.shape == (2, 256, 2) and y.shape == (2, 256, 3)

    grid_file = tmp_path / "t.nc"
    values = np.random.default_rng(0).random((20, 5, 4)).astype(np.float32)
    values[:, 1, 1] = -1e34  # a point missing everywhere
    _write_netcdf(grid_file, values)
    sphere = datasets.build("grid_file", root=str(grid_file), variable="T2M", grid_stride=1)
    assert sphere.kind == "sphere" and sphere.n_train == 18 and len(sphere.test) == 2
    x, y = sphere.context(sphere.test)
    assert x.shape == (2, 19, 3) and y.shape == (2, 19, 1)  # 20 points, one missing
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    with pytest.raises(ValueError, match="pass `root`"):
        datasets.build("audio_folder")
    with pytest.raises(ValueError, match="needs `variable`"):
        datasets.build("grid_file", root=str(grid_file))


def test_audio_folder_split_holds_out_whole_files(tmp_path):
    for i in range(3):
        soundfile.write(tmp_path / f"{i}.wav", np.zeros(3_200) + 0.1 * i, 16_000)
    audio = datasets.build(
        "audio_folder", root=str(tmp_path), seconds=0.05, test_fraction=0.3, audio_bound=2.5
    )
    assert audio.kind == "audio" and audio.data_range == 2.0
    x, _ = audio.context(audio.test)
    assert x[0, 0, 0].item() == -2.5 and x[0, -1, 0].item() == 2.5
    assert audio.n_train == 8 and len(audio.test) == 4  # 4 clips per file; last file held out
    torch.testing.assert_close(audio.test, torch.full((4, 800), 0.2), atol=1e-4, rtol=0)  # 16 bit


def test_standin_fetch_uses_the_cache_and_reports_failures(tmp_path, monkeypatch):
    monkeypatch.setenv("NCP_CACHE", str(tmp_path))
    target = tmp_path / "root" / standins.PATHS["video"]
    target.mkdir(parents=True)
    calls = []
    monkeypatch.setattr(standins, "_run", lambda cmd, cwd: calls.append(cmd))
    assert standins.fetch("video") == str(target)
    assert calls == []  # already there: no apt-get

    def failing(cmd, cwd):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 100, "", "E: no network")

    monkeypatch.setattr(standins, "_run", failing)
    with pytest.raises(RuntimeError, match=r"(?s)could not fetch 'stellarium-data'.*no network"):
        standins.fetch("deep_sky")
    assert calls[0] == ["apt-get", "download", "stellarium-data"]
    assert not os.path.exists(tmp_path / "root" / standins.PATHS["deep_sky"])
    with pytest.raises(ValueError, match="`name` must be one of"):
        standins.fetch("celeba")


def test_cache_dir_defaults_to_home(monkeypatch):
    monkeypatch.delenv("NCP_CACHE", raising=False)
    assert standins.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "ncp")
