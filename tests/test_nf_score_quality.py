"""examples/neural_fields: snapshots over meta-training and the score-quality study
(paper Fig. 4, Fig. 9, Fig. 10) on tiny runs."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("matplotlib", reason="the examples need the examples extra")
pytest.importorskip("tqdm", reason="the examples need the examples extra")

import ncp
from examples.neural_fields import evaluate, score_quality, train
from ncp.diagnostics import gradient_norms, pearson


def _settings(out, **kw):
    return {**train.PAPER, **train.SMOKE, "out": str(out), "data": "text", **kw}


@pytest.fixture(scope="module")
def snap_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("snap") / "run"
    train.train(_settings(out, method="gradncp", snapshot_every=1, outer_steps=2))
    return str(out)


def test_snapshots_hold_the_initialisation_and_every_nth_step(snap_run):
    assert train.snapshot_steps(snap_run) == [0, 1, 2]
    s = _settings(snap_run, method="gradncp", snapshot_every=1, outer_steps=2)
    torch.manual_seed(0)
    init = train.make_model(train.resolve(s), train.load_data(s)).state_dict()
    first = evaluate.load_run(snap_run, at_step=0)["model"].state_dict()
    last = evaluate.load_run(snap_run, at_step=2)["model"].state_dict()
    final = evaluate.load_run(snap_run)["model"].state_dict()
    for name in init:
        torch.testing.assert_close(first[name], init[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(last[name], final[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(first[n], last[n]) for n in init)  # training moved them


def test_snapshots_do_not_change_the_run(tmp_path, snap_run):
    plain = train.train(_settings(tmp_path / "plain", method="gradncp", outer_steps=2))
    assert train.snapshot_steps(str(tmp_path / "plain")) == []
    final = evaluate.load_run(snap_run)["model"].state_dict()
    for name, value in plain["model"].state_dict().items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=0, msg=name)


def test_snapshot_every_n_and_a_missing_step(tmp_path):
    out = tmp_path / "every2"
    train.train(_settings(out, method="maml", inner_steps=1, snapshot_every=2, outer_steps=3))
    assert train.snapshot_steps(str(out)) == [0, 2]
    with pytest.raises(ValueError, match=r"`at_step`=1: .* snapshots at steps \[0, 2\]"):
        evaluate.load_run(str(out), at_step=1)
    with pytest.raises(ValueError, match="`init` is 'random'"):
        evaluate.load_run(str(out), init="random", at_step=0)


def test_correlation_by_step_is_pearson_of_head_and_whole_network_norms():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    x, y = torch.rand(2, 40, 2), torch.rand(2, 40, 3)
    cfg = ncp.MetaConfig(inner_steps=3, inner_lr=0.1, pruner=ncp.ContextPruner(ratio=0.25))
    found = score_quality.correlation_by_step(model, cfg, x, y, [0, 2], mode="pruned")
    for k in (0, 2):
        if k == 0:
            params = ncp.functional.init_params(model, 2, detach=True)
        else:
            params = ncp.adapt(model, x, y, cfg, steps=k, mode="pruned").params
        head = gradient_norms(model, params, x, y, names=["2.weight", "2.bias"])
        whole = gradient_norms(model, params, x, y)
        torch.testing.assert_close(found[k], pearson(head, whole))
    assert not torch.allclose(found[0], found[2])  # the parameters moved between the counts
    maml = ncp.MetaConfig(pruner=None, bootstrap=None)
    with pytest.raises(ValueError, match=r"`mode`='pruned' needs `cfg\.pruner`"):
        score_quality.correlation_by_step(model, maml, x, y, [0], mode="pruned")
    with pytest.raises(ValueError, match="`mode` must be one of"):
        score_quality.correlation_by_step(model, cfg, x, y, [0], mode="rescaled")
    with pytest.raises(ValueError, match="`steps` must be step counts >= 0"):
        score_quality.correlation_by_step(model, cfg, x, y, [-1])


def test_rank_profile_marks_the_pruners_own_kept_points():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    x, y = torch.rand(1, 50, 2), torch.rand(1, 50, 1)
    cfg = ncp.MetaConfig(inner_steps=2, inner_lr=0.1, pruner=ncp.ContextPruner(ratio=0.2))
    profile = score_quality.rank_profile(model, cfg, x, y, [0, 2])
    for k, p in profile.items():
        assert int(p["kept"].sum()) == 10
        params = None if k == 0 else ncp.adapt(model, x, y, cfg, steps=k, mode="pruned").params
        chosen = cfg.pruner(model, x, y, params=params).indices[0]
        assert set(p["kept"].nonzero().flatten().tolist()) == set(chosen.tolist())
        top_loss = set(p["loss"].topk(10).indices.tolist())
        share = len(top_loss & set(chosen.tolist())) / 10
        assert float(p["overlap"]) == pytest.approx(share)
    with pytest.raises(ValueError, match="one signal"):
        score_quality.rank_profile(model, cfg, x.expand(2, -1, -1), y.expand(2, -1, -1), [0])


def test_cli_writes_the_table_figures_and_refuses_a_run_without_snapshots(
    snap_run, tmp_path, capsys
):
    out = tmp_path / "sq"
    argv = ["training", "--run", snap_run, "--out", str(out), "--inner-steps", "0", "1"]
    path = score_quality.main([*argv, "--signals", "2"])
    assert path.endswith("score_quality.png") and (out / "score_quality.png").stat().st_size > 0
    results = json.loads((out / "score_quality.json").read_text())
    assert [(p["outer_step"], p["k"]) for p in results[0]["points"]] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
    ]
    assert all(len(p["r"]) == 2 and -1 <= p["mean"] <= 1 for p in results[0]["points"])
    table = (out / "score_quality.md").read_text()
    assert "| gradncp K=" in table and "steps 0-2" in table
    assert "r after 1 steps - r after 0" in table
    assert (out / "score_quality_steps.png").stat().st_size > 0
    one = score_quality.over_training(snap_run, steps=[0], signals=1, at=[2, 0])
    assert [p["outer_step"] for p in one["points"]] == [0, 2]
    with pytest.raises(ValueError, match=r"no snapshots at steps \[5\]; it has \[0, 1, 2\]"):
        score_quality.over_training(snap_run, at=[5])
    fig10 = tmp_path / "fig10.png"
    score_quality.main(["ranks", "--run", snap_run, "--out", str(fig10), "--inner-steps", "0", "1"])
    summary = json.loads((tmp_path / "fig10.json").read_text())
    assert set(summary["overlap"]) == {"0", "1"} and summary["kept"] == summary["points"] // 4
    assert fig10.stat().st_size > 0
    plain = tmp_path / "plain"
    train.train(_settings(plain, method="maml", inner_steps=1, outer_steps=1))
    with pytest.raises(SystemExit):
        score_quality.main(["training", "--run", str(plain), "--out", str(tmp_path / "x")])
    assert "has no snapshots: train it with --snapshot-every" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        score_quality.main(["ranks", "--run", snap_run, "--out", str(fig10), "--signal", "-1"])
    assert "--signal must be in [0," in capsys.readouterr().err


def test_dtype_agreement_is_exact_for_the_same_dtype_and_measures_bf16():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    x, y = torch.rand(2, 64, 2), torch.rand(2, 64, 3)
    cfg = ncp.MetaConfig(inner_steps=2, inner_lr=0.1, pruner=ncp.ContextPruner(ratio=0.25))
    same = score_quality.dtype_agreement(model, cfg, x, y, [0, 2], None)
    assert same == {0: {"rel_err": 0.0, "overlap": 1.0}, 2: {"rel_err": 0.0, "overlap": 1.0}}
    bf16 = score_quality.dtype_agreement(model, cfg, x, y, [0], torch.bfloat16)
    ref = ncp.ContextPruner(ratio=0.25, score_dtype=torch.bfloat16).scores(model, x, y)
    full = cfg.pruner.scores(model, x, y)
    assert bf16[0]["rel_err"] == pytest.approx(((full - ref).abs() / full).mean().item())
    assert 0 < bf16[0]["rel_err"] < 0.1 and 0 <= bf16[0]["overlap"] <= 1


def test_dtype_cli_prints_one_line_per_step(snap_run, capsys):
    text = score_quality.main(
        ["dtype", "--run", snap_run, "--signals", "2", "--inner-steps", "0", "1"]
    )
    assert text.count("kept sets share") == 2 and "after 1 pruned steps" in text
    with pytest.raises(SystemExit):
        score_quality.main(["ranks", "--run", snap_run])
    assert "ranks needs --out" in capsys.readouterr().err
