"""NeRV (examples/neural_fields/models.py): a convolutional head, whole frames as points."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import ncp
from examples.neural_fields import train
from examples.neural_fields.models import NeRV
from examples.neural_fields.signals import frame_context
from tests import _reference

F64 = dict(rtol=1e-6, atol=1e-8)
HEAD = ["head.weight", "head.bias"]


def _nerv_and_video(tasks=2, frames=6, seed=0):
    torch.manual_seed(seed)
    model = NeRV(resolution=16, blocks=2, channels=8, frequencies=4, hidden=16).double()
    g = torch.Generator().manual_seed(seed)
    videos = torch.rand(tasks, frames, 16, 16, 3, generator=g, dtype=torch.float64)
    return model, *frame_context(videos)


def test_frames_are_points_and_the_output_is_channels_last():
    model, x, y = _nerv_and_video()
    assert x.shape == (2, 6, 1) and y.shape == (2, 6, 16, 16, 3)
    assert_close(x[0, :, 0], torch.linspace(-1, 1, 6, dtype=torch.float64))
    assert model(x[0]).shape == (6, 16, 16, 3)
    with pytest.raises(ValueError, match="multiple of 2\\*\\*blocks = 8"):
        NeRV(resolution=20, blocks=3)


def test_gradncp_score_of_a_frame_is_its_head_gradient_norm():
    model, x, y = _nerv_and_video()
    select = ncp.ContextPruner(ratio=0.5).prepare(model, x, y)
    assert (select.head, select.strategy) == ("head", "exact")
    params = ncp.functional.init_params(model, 2)
    scores = select.scores(params, x, y)
    for t in range(2):
        leaves = {n: v[t] for n, v in params.items()}
        want = _reference.exact_scores(model, leaves, x[t], y[t], ncp.losses.mse, HEAD)
        assert_close(scores[t], want, rtol=1e-10, atol=1e-12)
    assert scores.std() > 0  # the frames differ, and so do their scores


def test_meta_gradient_with_pruned_frames_equals_the_reference_unroll():
    model, x, y = _nerv_and_video(frames=5)
    cfg = ncp.MetaConfig(
        inner_steps=2,
        inner_lr=0.1,
        pruner=ncp.ContextPruner(ratio=0.4),
        bootstrap=ncp.BootstrapMetaLoss(steps=1, lr=0.1, weight=2.0),
    )
    out = ncp.meta_step(model, (x, y), cfg)
    ref = _reference.meta_step_of(model, x, y, cfg, HEAD)
    assert out.kept_indices.shape == (2, 2, 2)
    assert_close(out.loss, ref["loss"], **F64)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(
        torch.autograd.grad(out.loss, params),
        torch.autograd.grad(ref["loss"], params),
        strict=True,
    ):
        assert_close(a, b, **F64)


def test_train_builds_nerv_for_video_only(tmp_path):
    from tests.test_nf_train import _video_root

    s = {**train.PAPER, **train.SMOKE, "model": "nerv", "out": str(tmp_path / "run")}
    video = {**s, "data": "video_folder", "root": str(_video_root(tmp_path))}
    signals = train.load_data(video)
    assert signals.frame_points and signals.in_features == 1
    model = train.make_model(video, signals)
    x, y = signals.context(signals.test[:2])
    assert isinstance(model, NeRV) and model(x[0]).shape == y.shape[1:]
    text = train.load_data({**s, "data": "text"})
    with pytest.raises(ValueError, match="--model nerv decodes square video frames"):
        train.make_model({**s, "data": "text"}, text)
