"""The one-view NeRF example (examples/nerf/): scenes, renderer, scoring, meta-step, run folder."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch.testing import assert_close

import ncp
from examples.nerf import reproduce, scenes, train
from examples.nerf.model import TinyNeRF
from tests import _reference

F64 = dict(rtol=1e-6, atol=1e-8)
TINY = dict(
    scenes=6,
    val_scenes=2,
    test_scenes=2,
    views=3,
    resolution=8,
    rays=32,
    query_rays=24,
    hidden=8,
    layers=1,
    samples=6,
    frequencies=2,
    outer_steps=3,
    batch=2,
    test_steps=2,
    log_every=1,
    ckpt_every=1,
)


def test_renderer_hits_a_known_sphere_and_misses_to_white():
    sphere = scenes.Spheres(
        centre=torch.zeros(1, 1, 3),
        radius=torch.tensor([[0.5]]),
        colour=torch.tensor([[[0.2, 0.4, 0.8]]]),
        axis=torch.tensor([[[1.0, 0.0, 0.0]]]),
        frequency=torch.tensor([[3.0]]),
    )
    # Along -z from z=3: hits (0, 0, 0.5) with normal +z; past the sphere: misses.
    rays = torch.tensor([[[0.0, 0.0, 3.0, 0.0, 0.0, -1.0], [2.0, 0.0, 3.0, 0.0, 0.0, -1.0]]])
    got = sphere.render(rays)[0]
    light = torch.tensor(scenes.LIGHT) / torch.tensor(scenes.LIGHT).norm()
    shade = 0.5 + 0.5 * light[2]  # normal (0, 0, 1)
    stripes = 0.7 + 0.3 * math.sin(0.0)  # (hit - centre) . axis = 0
    assert_close(got[0], torch.tensor([0.2, 0.4, 0.8]) * shade * stripes)
    assert_close(got[1], torch.ones(3))


def test_cameras_look_at_the_origin_from_their_distance():
    rays = scenes.camera_rays(torch.tensor([0.3, 2.0]), torch.tensor([0.1, 0.5]), 4)
    assert rays.shape == (2, 16, 6)
    assert_close(rays[..., :3].norm(dim=-1), torch.full((2, 16), scenes.CAMERA_DISTANCE))
    assert_close(rays[..., 3:].norm(dim=-1), torch.ones(2, 16))
    # The four central pixels of a 4x4 view surround the optical axis, which hits the origin.
    centre = rays[:, [5, 6, 9, 10], 3:].mean(1)
    axis = -rays[:, 0, :3] / scenes.CAMERA_DISTANCE
    assert_close(centre / centre.norm(dim=-1, keepdim=True), axis, rtol=0, atol=1e-6)


def test_scene_sets_are_deterministic_and_disjoint_by_seed():
    a, b = scenes.make_scenes(3, 2, 8, seed=0), scenes.make_scenes(3, 2, 8, seed=0)
    assert torch.equal(a.colours, b.colours) and a.rays.shape == (3, 2, 64, 6)
    assert not torch.equal(a.colours, scenes.make_scenes(3, 2, 8, seed=1).colours)
    assert (a.colours < 1).any() and (a.colours == 1).any()  # objects and background
    with pytest.raises(ValueError, match="`views` must be an int >= 2, got 1"):
        scenes.make_scenes(3, 1, 8, seed=0)


def test_empty_field_renders_the_white_background():
    model = TinyNeRF(hidden=4, layers=1, samples=5)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -40.0]))  # density ~ exp(-41)
    rays = scenes.camera_rays(torch.tensor([0.0]), torch.tensor([0.0]), 3)[0]
    assert_close(model(rays), torch.ones(9, 3))
    with pytest.raises(ValueError, match="origin and direction"):
        model(torch.zeros(4, 3))


def _nerf_task(seed=0):
    torch.manual_seed(seed)
    model = TinyNeRF(hidden=6, layers=1, samples=5, frequencies=1).double()
    data = scenes.make_scenes(2, 3, 4, seed=seed)
    cx, cy = data.rays[:, 0].double(), data.colours[:, 0].double()
    qx, qy = data.rays[:, 1].double(), data.colours[:, 1].double()
    return model, cx, cy, qx, qy


def test_a_ray_is_scored_by_its_exact_head_gradient_in_closed_form():
    """The head sees (rays, samples, hidden): ncp sums the samples' outer products in closed
    form, and that equals per-ray autograd of the head's parameters."""
    model, cx, cy, _, _ = _nerf_task()
    select = ncp.ContextPruner(ratio=0.5).prepare(model, cx, cy)
    assert (select.head, select.strategy) == ("head", "loop")
    params = dict(model.named_parameters())
    got = ncp.ContextPruner(ratio=0.5).scores(model, cx, cy)
    want = torch.stack(
        [
            _reference.exact_scores(
                model, params, cx[t], cy[t], ncp.losses.mse, ["head.weight", "head.bias"]
            )
            for t in range(2)
        ]
    )
    assert_close(got, want, **F64)


def test_nerf_meta_gradient_equals_the_reference_unroll_with_a_disjoint_query():
    model, cx, cy, qx, qy = _nerf_task(seed=1)
    cfg = ncp.MetaConfig(
        inner_steps=3,
        inner_lr=0.5,
        pruner=ncp.ContextPruner(ratio=0.5),
        bootstrap=ncp.BootstrapMetaLoss(steps=2, lr=0.5, weight=3.0),
    )
    out = ncp.meta_step(model, (cx, cy, qx, qy), cfg)
    got = torch.autograd.grad(out.loss, list(model.parameters()))
    ref = _reference.meta_step(
        model, cx, cy, qx, qy, loss_fn=ncp.losses.mse, steps=3, lr=0.5, ratio=0.5,
        head_names=["head.weight", "head.bias"], boot_steps=2, boot_lr=0.5, weight=3.0,
    )  # fmt: skip
    want = torch.autograd.grad(ref["loss"], list(model.parameters()))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, **F64)
    assert not torch.equal(out.query_loss, ref["query_loss"] * 0)


def test_train_writes_every_mode_and_resumes_exactly(tmp_path):
    whole = train.train({**TINY, "out": str(tmp_path / "whole")})
    assert set(whole["test"]) == set(train.MODES) and whole["outer_steps"] == 3
    assert whole["headline"] == max(train.MODES, key=lambda m: whole["val"][m]["psnr"])
    assert len(whole["test"]["plain"]["per_scene"]) == TINY["test_scenes"]
    part = {**TINY, "out": str(tmp_path / "part")}
    assert train.train(part, stop_after=2) == {}  # interrupted after step 2
    resumed = train.train(part)
    assert resumed["test"] == whole["test"]
    with open(tmp_path / "whole" / train.RESULT) as f:
        assert json.load(f)["test"] == whole["test"]
    with pytest.raises(ValueError, match="hidden: 8 -> 16"):
        train.train({**part, "hidden": 16})


@pytest.mark.parametrize("method, k", [("maml", 4), ("gradncp", 16), ("random", 16)])
def test_methods_use_the_papers_horizons_at_one_memory(method, k):
    s = train.resolve({"method": method})
    cfg = train.make_config(s)
    assert cfg.inner_steps == k
    assert (cfg.pruner is None) == (method == "maml")
    assert (cfg.bootstrap is None) == (method != "gradncp")
    if method == "random":
        assert cfg.pruner.score == "random"


def test_bad_settings_name_the_flag_and_the_limit():
    with pytest.raises(ValueError, match="`--rays` must be at most the pixels of a view \\(64"):
        train.resolve({"resolution": 8, "rays": 65})
    with pytest.raises(ValueError, match="`--method` must be one of"):
        train.resolve({"method": "nerf"})
    with pytest.raises(ValueError, match="unknown NeRF settings \\['lr'\\]"):
        train.resolve({"lr": 0.1})


def test_reproduce_summarises_seeds_and_pairs_with_maml(tmp_path, monkeypatch):
    out = str(tmp_path)
    for method in ("maml", "gradncp"):
        for seed in (0, 1):
            train.train(
                {
                    **TINY,
                    "method": method,
                    "seed": seed,
                    "out": os.path.join(out, f"{method}_s{seed}"),
                }
            )
    text = reproduce.summary(out, [0, 1])
    headline_table = text.split("\n\n")[0].splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in headline_table}
    g = [reproduce.read(out, "gradncp", s) for s in (0, 1)]
    m = [reproduce.read(out, "maml", s) for s in (0, 1)]
    diffs = [
        a["test"][a["headline"]]["psnr"] - b["test"][b["headline"]]["psnr"]
        for a, b in zip(g, m, strict=True)
    ]
    mean = sum(diffs) / 2
    assert f"{mean:.2f} ±" in rows["gradncp"]
    assert "not run" in rows["random"]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        reproduce.command("maml", 0, out, ["lr=1"])


def test_figure_renders_ground_truth_and_each_run(tmp_path):
    pytest.importorskip("matplotlib", reason="the figure needs the examples extra")
    from examples.nerf import figure

    run = str(tmp_path / "run")
    train.train({**TINY, "out": run})
    truth, pred = figure.renders(run, [0, 1])
    assert truth.shape == pred.shape == (2, TINY["views"], 8, 8, 3)
    assert pred.min() >= 0 and pred.max() <= 1 and not torch.equal(truth, pred)
    out = tmp_path / "views.png"
    figure.main(["--run", run, "--run", run, "--scenes", "0", "1", "--out", str(out)])
    assert out.stat().st_size > 0
    with pytest.raises(ValueError, match="`--scenes` must be below 2"):
        figure.renders(run, [5])


def test_gradnorm_follows_the_pruned_steps_at_the_runs_inner_lr(tmp_path):
    from examples.nerf import gradnorm
    from examples.neural_fields.gradnorm import grad_ratios

    run = str(tmp_path / "run")
    train.train({**TINY, "out": run})
    model, s = train.load_run(run)
    test = train.splits(s)["test"]
    x, y = test.rays[:, 0], test.colours[:, 0]
    at_run = grad_ratios(model, x, y, 0.5, 2, s["inner_lr"])
    at_small = grad_ratios(model, x, y, 0.5, 2, 1e-3)
    assert_close(at_run[0], at_small[0])  # the first step is taken at the initialisation
    assert not torch.allclose(at_run[1], at_small[1])  # later ones where the lr moved it
    lines = gradnorm.main(["--run", run, "--ratios", "0.5", "--inner-steps", "2"])
    assert f"inner lr {s['inner_lr']:g}" in lines[0]
    values = [float(v) for v in lines[1].split(": ")[1].split(" | ")[0].split()]
    assert values == pytest.approx(at_run.mean(1).tolist(), abs=5e-3)
    with pytest.raises(SystemExit):
        gradnorm.main(["--run", run, "--ratios", "0"])
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint\.pt"):
        train.load_run(str(tmp_path / "missing"))
