"""Conv4, the memory budget, training, resuming and evaluation of examples/many_shot."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import ncp
from examples.many_shot import budget
from examples.many_shot.compare import ARMS, compare, seed_stats, summarise_dir
from examples.many_shot.model import Conv4
from examples.many_shot.train import (
    RunConfig,
    class_coverage,
    evaluate,
    learned_lr,
    load_splits,
    mean_ci,
    meta_config,
    run,
    train,
)
from tests.test_many_shot_data import write_fashion, write_mini_imagenet

pytestmark = pytest.mark.usefixtures("one_thread")


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
        "bootstrap_steps": 1,
        "outer_steps": 2,
        "eval_episodes": 4,
        "val_episodes": 2,
        "eval_tasks": 2,
        "fashion_val": 6,
        "threads": 1,
        "progress": False,
        "log_every": 1,
        "ckpt_every": 1,
        "out": str(tmp_path / "run"),
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
    with pytest.raises(ValueError, match="`--bootstrap-chunk` must be >= 1 support points, got 0"):
        RunConfig(bootstrap_chunk=0)
    with pytest.raises(ValueError, match=r"`--clip` must be > 0, got 0\.0; pass --no-clip"):
        RunConfig(clip=0.0)
    with pytest.raises(ValueError, match=r"`--eval-modes` takes one or more of .*'best'"):
        RunConfig(eval_modes=("best",))
    with pytest.raises(ValueError, match=r"`--learned-lr` must be one of .*got 'yes'"):
        RunConfig(learned_lr="yes")


def test_flags_reach_the_meta_config():
    cfg = RunConfig(
        ways=5, maml_steps=2, ratio=0.25, inner_lr=0.1, balance=True, bootstrap_chunk=125
    )
    meta = meta_config(cfg)
    assert meta.inner_steps == 8  # the paper's rule: maml_steps / ratio
    assert meta.pruner.balance_classes == 5 and meta.pruner.ratio == 0.25
    assert meta.bootstrap.chunk_size == 125
    assert meta.bootstrap.lr == pytest.approx(0.5)  # default: 5x the inner lr
    assert meta.bootstrap.weight == 100.0
    assert cfg.clip == 1.0
    plain = meta_config(
        dataclasses.replace(cfg, balance=False, bootstrap_chunk=None, bootstrap_lr=0.2)
    )
    assert plain.pruner.balance_classes is None and plain.bootstrap.chunk_size is None
    assert plain.bootstrap.lr == 0.2
    maml = meta_config(cfg, "maml")
    assert maml.pruner is None and maml.bootstrap is None and maml.inner_steps == 2
    model = Conv4(5, in_channels=1, hidden=4, image_size=16)
    rates = learned_lr(cfg, model)
    assert rates.steps == 8 and not rates.per_parameter
    assert torch.allclose(rates.rates[0], torch.full((8,), 0.1))
    assert learned_lr(cfg, model, "maml").steps == 2
    per = learned_lr(dataclasses.replace(cfg, learned_lr="parameter"), model)
    assert per.per_parameter and per.rate(3, "head.weight").shape == model.head.weight.shape
    assert learned_lr(dataclasses.replace(cfg, learned_lr="none"), model) is None


def test_class_coverage_counts_missing_classes_by_hand():
    labels = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2]])
    kept = torch.tensor(
        [
            [[0, 1, 2], [0, 1, 2]],  # task 0 keeps labels 0,0,1 (class 2 missing); task 1: 0,1,2
            [[0, 2, 4], [3, 4, 5]],  # task 0: 0,1,2; task 1: 0,1,2
        ]
    )
    cover = class_coverage(kept, labels, ways=3)
    assert cover["pairs"] == 4
    assert cover["missing"] == pytest.approx(1 / 4)
    assert cover["min_share"] == pytest.approx((0 + 1 / 3 + 1 / 3 + 1 / 3) / 4)


def test_seed_stats_uses_student_t():
    s = seed_stats([0.5, 0.7, 0.6])
    # std 0.1; t_{0.975, 2} = 4.302653; 4.302653 * 0.1 / sqrt(3) = 0.248414
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    assert s["ci95"] == pytest.approx(0.248414, abs=1e-6)
    assert seed_stats([0.5])["ci95"] is None


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


def test_fit_bootstrap_chunk_keeps_the_horizon_and_chunks_the_bootstrap():
    torch.manual_seed(0)
    model = Conv4(2, in_channels=1, hidden=4, image_size=16)
    x, y = torch.randn(1, 32, 1, 16, 16), torch.arange(2).repeat(16)[None]
    batch = (x, y, x[:, :4], y[:, :4])
    maml = ncp.MetaConfig(inner_steps=1, pruner=None, bootstrap=None)
    ncp_cfg = ncp.MetaConfig(
        inner_steps=4,  # the rule: 1 / 0.25
        pruner=ncp.ContextPruner(ratio=0.25),
        bootstrap=ncp.BootstrapMetaLoss(steps=1),
    )
    fit = budget.fit_bootstrap_chunk(model, batch, maml, ncp_cfg, slack=0.1)
    limit = 1.1 * fit["maml_bytes"]
    assert fit["maml_bytes"] == budget.saved_bytes(model, batch, maml)
    assert fit["gradncp_bytes"] > limit  # the full-support bootstrap graph overflows
    assert fit["gradncp_no_bootstrap_bytes"] < limit  # the pruned steps alone fit
    assert fit["bootstrap_chunk"] is not None and fit["gradncp_chunked_bytes"] <= limit
    boot = dataclasses.replace(ncp_cfg.bootstrap, chunk_size=2 * fit["bootstrap_chunk"])
    bigger = budget.saved_bytes(model, batch, dataclasses.replace(ncp_cfg, bootstrap=boot))
    assert bigger > limit  # the largest candidate chunk that fits
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match=r"even with a bootstrap chunk of 1 point"):
        budget.fit_bootstrap_chunk(model, batch, maml, ncp_cfg, slack=0.0)
    with pytest.raises(ValueError, match=r"`slack` must be in \[0, 1\), got 2"):
        budget.fit_bootstrap_chunk(model, batch, maml, ncp_cfg, slack=2)


def test_smoke_train_and_evaluate_both_methods_and_loaders(tmp_path):
    write_mini_imagenet(tmp_path / "mini", per_class=7)
    write_fashion(tmp_path / "fashion")
    mini = tiny(tmp_path, data="mini-imagenet", data_root=str(tmp_path / "mini"), method="maml")
    fashion = tiny(
        tmp_path, data="fashion", data_root=str(tmp_path / "fashion"), out=str(tmp_path / "f")
    )
    for cfg in (mini, fashion):
        result = run(cfg)
        assert result["method"] == cfg.method
        for split, episodes in (("val", 2), ("test", 4)):
            for mode in ("plain", "rescaled", "pruned"):  # every mode, for MAML too
                r = result["eval"][split][mode]
                assert 0.0 <= r["mean"] <= 1.0 and r["episodes"] == episodes
                assert (r["coverage"] is not None) == (mode == "pruned")
        assert result["saved_bytes_per_task"] > 0
        assert len(result["learned_lr"]) == result["inner_steps"]
        lines = (tmp_path / cfg.out / "metrics.jsonl").read_text().splitlines()
        logged = [json.loads(x) for x in lines]
        assert [r["step"] for r in logged] == [1, 2]
        assert all(math.isfinite(r["loss"]) for r in logged)
    assert result["inner_steps"] == 2  # GradNCP: maml_steps / ratio
    assert logged[0]["bootstrap_loss"] is not None
    assert 0.0 <= logged[0]["missing_class"] <= 1.0 and logged[0]["min_class_share"] >= 0.0
    assert result["training_coverage"]["logged_steps"] == 2
    assert logged[0]["grad_norm"] is not None and len(logged[0]["inner_lr"]) == 2


def test_eval_modes_differ_and_balanced_pruning_keeps_every_class(tmp_path):
    write_fashion(tmp_path / "fashion")
    cfg = tiny(
        tmp_path,
        data="fashion",
        data_root=str(tmp_path / "fashion"),
        ways=3,
        shots=4,
        ratio=0.34,  # k = 4 of 12 support points: 1 per class and one leftover
        outer_steps=1,
        learned_lr="none",
    )
    splits = load_splits(cfg)
    assert set(splits) == {"train", "val", "test"}
    model, rates = train(cfg, splits)
    assert rates is None
    accs = {
        mode: evaluate(model, cfg, splits["test"], mode=mode, episodes=4)
        for mode in ("plain", "rescaled", "pruned")
    }
    assert all(a.shape == (4,) and c is None for m, (a, c) in accs.items() if m != "pruned")
    balanced = dataclasses.replace(cfg, balance=True)
    _, cover = evaluate(model, balanced, splits["test"], mode="pruned", episodes=4)
    assert cover["missing"] == 0.0 and cover["min_share"] >= 1 / 4
    with pytest.raises(ValueError, match="`mode` must be one of"):
        evaluate(model, cfg, splits["test"], mode="best")


def test_resume_is_exact(tmp_path):
    write_fashion(tmp_path / "fashion")
    root = str(tmp_path / "fashion")
    flags = {"data": "fashion", "data_root": root, "balance": True, "bootstrap_chunk": 3}
    straight, straight_lr = train(tiny(tmp_path, **flags, outer_steps=4, out=str(tmp_path / "a")))
    half = tiny(tmp_path, **flags, outer_steps=2, out=str(tmp_path / "b"))
    _, half_lr = train(half)
    resumed, resumed_lr = train(dataclasses.replace(half, outer_steps=4))
    assert not torch.equal(half_lr.rates[0], resumed_lr.rates[0])  # the rates kept training
    assert torch.equal(straight_lr.rates[0], resumed_lr.rates[0])
    assert not torch.equal(straight_lr.rates[0], torch.full_like(straight_lr.rates[0], 0.01))
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
    with pytest.raises(ValueError, match=r"balance: True -> False"):
        train(dataclasses.replace(half, outer_steps=4, balance=False))


def test_compare_reports_every_arm_over_seeds_and_picks_the_mode_on_validation(tmp_path):
    write_fashion(tmp_path / "fashion")
    cfg = tiny(
        tmp_path,
        data="fashion",
        data_root=str(tmp_path / "fashion"),
        outer_steps=1,
        shots=6,  # 2-way: k = 3 of 12 support points
        queries=1,
        fashion_val=7,  # 15 images a class: 8 train, 7 val, each >= shots + queries
        ratio=0.25,
        maml_steps=1,
        eval_modes=("plain", "pruned"),
    )
    summary = compare(cfg, tmp_path / "cmp", seeds=[0, 1], memory=True, slack=0.5)
    s = summary["summary"]
    assert set(s) == set(ARMS)
    mem = summary["memory"]
    assert mem["gradncp_steps"] == 4 and s["gradncp"]["inner_steps"] == 4  # rule kept
    assert mem["gradncp_bytes"] > 0 and mem["maml_bytes"] > 0
    if mem["bootstrap_chunk"] is not None:  # chunked only when the unchunked bootstrap overflows
        assert mem["gradncp_bytes"] > mem["maml_bytes"] >= mem["gradncp_chunked_bytes"]
    assert s["gradncp-balanced"]["bootstrap_chunk"] == mem["bootstrap_chunk"]
    for arm in ARMS:
        assert s[arm]["seeds"] == [0, 1]
        val = s[arm]["eval"]["val"]
        assert set(val) == {"plain", "pruned"}
        assert s[arm]["headline_mode"] == max(val, key=lambda m: val[m]["mean"])
        test = s[arm]["eval"]["test"][s[arm]["headline_mode"]]
        assert s[arm]["headline_test"] == test
        assert test["mean"] == pytest.approx(np.mean(test["seeds"]))
    diffs = [
        a - b
        for a, b in zip(
            s["gradncp"]["headline_test"]["seeds"], s["maml"]["headline_test"]["seeds"], strict=True
        )
    ]
    assert s["gradncp"]["vs_maml"]["seeds"] == pytest.approx(diffs)
    assert s["gradncp"]["vs_maml"]["mean"] == pytest.approx(np.mean(diffs))
    assert s["maml"]["vs_maml"] is None
    assert s["maml"]["training_coverage"] is None
    assert s["gradncp-balanced"]["training_coverage"]["missing"] == 0.0
    table = (tmp_path / "cmp" / "summary.md").read_text()
    assert "| maml |" in table and "| gradncp-balanced |" in table
    again = summarise_dir(tmp_path / "cmp")
    assert again["summary"]["gradncp"]["eval"] == s["gradncp"]["eval"]
    assert again["memory"] == mem
    with pytest.raises(FileNotFoundError, match="no finished run"):
        summarise_dir(tmp_path)
