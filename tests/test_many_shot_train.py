"""Conv4, the memory budget, training, resuming and evaluation of examples/many_shot."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

import ncp
from examples.many_shot import budget
from examples.many_shot.compare import compare, summarise_dir
from examples.many_shot.model import Conv4
from examples.many_shot.train import RunConfig, mean_ci, meta_config, run, train
from tests.test_many_shot_data import write_fashion, write_mini_imagenet


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tiny models only thrash on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(tmp_path, **kw) -> RunConfig:
    """A configuration small enough for a 2-core CI machine."""
    base = {
        "image_size": 16,
        "hidden": 4,
        "ways": 2,
        "shots": 4,
        "queries": 2,
        "tasks": 2,
        "maml_steps": 1,
        "ratio": 0.5,
        "boot_steps": 1,
        "outer_steps": 2,
        "eval_episodes": 4,
        "eval_tasks": 2,
        "threads": 1,
        "progress": False,
        "log_every": 1,
        "ckpt_every": 1,
        "run_dir": str(tmp_path / "run"),
    }
    base.update(kw)
    return RunConfig(**base)


def test_conv4_shapes_and_ncp_accepts_it():
    model = Conv4(5, in_channels=1, hidden=8, image_size=28)
    assert model(torch.rand(7, 1, 28, 28)).shape == (7, 5)
    assert model.head.in_features == 8 * 1 * 1  # 28 -> 14 -> 7 -> 3 -> 1
    assert list(model.buffers()) == []  # no running statistics anywhere
    big = Conv4(5, in_channels=3, hidden=64, image_size=84)
    assert big.head.in_features == 64 * 5 * 5  # the classic 1600-dim Conv4 embedding
    x, y = torch.randn(2, 10, 1, 28, 28), torch.randint(0, 5, (2, 10))
    cfg = ncp.MetaConfig(inner_steps=2, pruner=ncp.ContextPruner(ratio=0.5))
    for norm in ("batch", "group"):
        m = Conv4(5, in_channels=1, hidden=8, image_size=28, norm=norm)
        out = ncp.meta_step(m, (x, y, x[:, :4], y[:, :4]), cfg, loss_fn=ncp.losses.cross_entropy)
        out.loss.backward()
        assert out.kept_indices.shape == (2, 2, 5)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    # The alternative the module avoids: batch norm with running statistics is refused.
    tracked = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))
    tracked(x[0])
    with pytest.raises(ValueError, match="track_running_stats=False"):
        ncp.meta_step(tracked, (x, y), cfg, loss_fn=ncp.losses.cross_entropy)


def test_conv4_rejects_bad_arguments():
    with pytest.raises(
        ValueError, match=r"`Conv4.image_size` must be >= 16 \(four 2x2 poolings\), got 8"
    ):
        Conv4(5, image_size=8)
    with pytest.raises(ValueError, match=r"`Conv4.norm` must be one of"):
        Conv4(5, norm="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`Conv4.ways` must be a positive int, got 0"):
        Conv4(0)


def test_mean_ci_matches_hand_computation():
    mean, half = mean_ci([0.5, 0.7, 0.6, 0.8])
    # mean 0.65; sample std sqrt(0.05 / 3) = 0.1290994; 1.96 * 0.1290994 / sqrt(4) = 0.1265174
    assert mean == pytest.approx(0.65)
    assert half == pytest.approx(0.1265174, abs=1e-7)
    with pytest.raises(ValueError, match="at least 2"):
        mean_ci([0.5])


def test_run_config_errors_name_the_flag():
    with pytest.raises(
        ValueError, match="`--method` must be one of \\['maml', 'gradncp'\\], got 'reptile'"
    ):
        RunConfig(method="reptile")
    with pytest.raises(ValueError, match="`--data mini-imagenet` needs `--data-root`"):
        RunConfig(data="mini-imagenet")
    with pytest.raises(ValueError, match="`--outer-steps` must be >= 1, got 0"):
        RunConfig(outer_steps=0)


def test_horizons_follow_the_equal_memory_rule():
    cfg = RunConfig(maml_steps=5, ratio=0.25)
    assert dataclasses.replace(cfg, method="maml").horizon == 5
    assert cfg.horizon == 20 and cfg.test_horizon == 20
    assert meta_config(cfg, "maml").pruner is None and meta_config(cfg).inner_steps == 20
    assert dataclasses.replace(cfg, inner_steps=12).test_horizon == 12


def test_match_steps_fits_gradncp_into_maml_budget():
    torch.manual_seed(0)
    model = Conv4(2, in_channels=1, hidden=4, image_size=16)
    x, y = torch.randn(1, 16, 1, 16, 16), torch.arange(2).repeat(8)[None]
    batch = (x, y, x[:, :4], y[:, :4])
    maml = ncp.MetaConfig(inner_steps=3, pruner=None, bootstrap=None)
    ncp_cfg = ncp.MetaConfig(
        inner_steps=1,
        pruner=ncp.ContextPruner(ratio=0.25),
        bootstrap=ncp.BootstrapMetaLoss(steps=1),
    )
    steps, used, limit = budget.match_steps(model, batch, maml, ncp_cfg, max_steps=30)
    assert limit == budget.saved_bytes(model, batch, maml)
    assert used <= limit
    over = budget.saved_bytes(model, batch, dataclasses.replace(ncp_cfg, inner_steps=steps + 1))
    assert over > limit  # the longest horizon that fits
    assert steps > maml.inner_steps  # pruning buys a longer horizon
    assert all(p.grad is None for p in model.parameters())


def test_smoke_train_and_evaluate_both_methods_and_loaders(tmp_path):
    write_mini_imagenet(tmp_path / "mini", per_class=7)
    write_fashion(tmp_path / "fashion")
    mini = tiny(tmp_path, data="mini-imagenet", data_root=str(tmp_path / "mini"), method="maml")
    fashion = tiny(
        tmp_path, data="fashion", data_root=str(tmp_path / "fashion"), run_dir=str(tmp_path / "f")
    )
    for cfg in (mini, fashion):
        result = run(cfg)
        assert result["method"] == cfg.method
        assert 0.0 <= result["test"]["mean"] <= 1.0 and result["test"]["episodes"] == 4
        assert result["saved_bytes_per_task"] > 0
        lines = (tmp_path / cfg.run_dir / "metrics.jsonl").read_text().splitlines()
        logged = [json.loads(x) for x in lines]
        assert [r["step"] for r in logged] == [1, 2]
        assert all(math.isfinite(r["loss"]) for r in logged)
    assert result["inner_steps"] == 2  # GradNCP: maml_steps / ratio
    assert "test_no_rescale" in result and result["test_no_rescale"]["rescale"] == "none"
    assert logged[0]["bootstrap_loss"] is not None


def test_resume_is_exact(tmp_path):
    write_fashion(tmp_path / "fashion")
    root = str(tmp_path / "fashion")
    straight = train(
        tiny(tmp_path, data="fashion", data_root=root, outer_steps=4, run_dir=str(tmp_path / "a"))
    )
    half = tiny(
        tmp_path, data="fashion", data_root=root, outer_steps=2, run_dir=str(tmp_path / "b")
    )
    train(half)
    resumed = train(dataclasses.replace(half, outer_steps=4))
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"inner_lr: 0\.01 -> 0\.5"):
        train(dataclasses.replace(half, outer_steps=4, inner_lr=0.5))


def test_compare_reports_both_methods_over_seeds(tmp_path):
    write_fashion(tmp_path / "fashion")
    cfg = tiny(
        tmp_path,
        data="fashion",
        data_root=str(tmp_path / "fashion"),
        outer_steps=1,
        plain_eval=False,
    )
    summary = compare(cfg, tmp_path / "cmp", seeds=[0, 1], match_memory=True)
    s = summary["summary"]
    assert set(s) == {"maml", "gradncp"}
    assert "no_rescale_mean_over_seeds" not in s["gradncp"]  # --no-plain-eval
    assert [x["seed"] for x in s["gradncp"]["seeds"]] == [0, 1]
    assert s["gradncp"]["inner_steps"] == summary["matched_memory"]["inner_steps"]
    assert summary["matched_memory"]["gradncp_bytes"] <= summary["matched_memory"]["maml_bytes"]
    table = (tmp_path / "cmp" / "summary.md").read_text()
    assert "| maml |" in table and "| gradncp |" in table
    again = summarise_dir(tmp_path / "cmp")["summary"]
    assert again["maml"]["seeds"] == s["maml"]["seeds"]
    assert again["gradncp"]["mean_over_seeds"] == s["gradncp"]["mean_over_seeds"]
    with pytest.raises(FileNotFoundError, match="no finished run"):
        summarise_dir(tmp_path)
