"""examples/neural_fields train / evaluate / figures / reproduce end to end in smoke mode, and
exact resumption from a checkpoint."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib", reason="the examples need the examples extra")
pytest.importorskip("tqdm", reason="the examples need the examples extra")

import ncp
from examples.neural_fields import evaluate, figures, reproduce, train


def _settings(out, **kw):
    return {**train.PAPER, **train.SMOKE, "out": str(out), **kw}


def _log_losses(out):
    return [(r["step"], r["loss"], r["query_loss"]) for r in train.read_log(out) if "loss" in r]


def test_resume_after_interruption_is_exact(tmp_path):
    kw = dict(data="text", score="random", inner_steps=2, steps=2, ckpt_every=100, eval_every=100)
    kw["learned_lr"] = "step"  # Meta-SGD rates are meta-parameters: saved and restored too
    straight = train.train(_settings(tmp_path / "a", **kw))
    first = train.train(_settings(tmp_path / "b", **kw), stop_after=1)
    assert first["step"] == 1 and (tmp_path / "b" / "checkpoint.pt").is_file()
    resumed = train.train(_settings(tmp_path / "b", **kw))
    assert resumed["step"] == 2
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert _log_losses(tmp_path / "a") == _log_losses(tmp_path / "b")
    # the interrupted run logged the start once and its evaluation at the end
    events = [r.get("event") for r in train.read_log(tmp_path / "b")]
    assert events.count("start") == 1 and events.count("eval") == 1
    rates = resumed["learned_lr"].rates[0]
    torch.testing.assert_close(rates, straight["learned_lr"].rates[0], rtol=0, atol=0)
    assert not torch.equal(rates, torch.full_like(rates, 1e-2))  # the rates were meta-trained
    res = evaluate.evaluate(str(tmp_path / "b"), test_steps=1, horizon=2, signals_limit=2)
    assert set(res["variants"]) == {"learned lr", "learned lr +rescale"}
    assert set(res["variants"]["learned lr"]["curve"]) == {"0", "1", "2"}


def test_resume_moved_the_parameters(tmp_path):
    kw = dict(data="text", method="maml", inner_steps=1, steps=2)
    torch.manual_seed(0)
    init = train.make_model(_settings(tmp_path, **kw), train.load_data(_settings(tmp_path, **kw)))
    done = train.train(_settings(tmp_path / "r", **kw))
    assert not torch.equal(
        init.state_dict()["net.0.weight"], done["model"].state_dict()["net.0.weight"]
    )
    log = train.read_log(tmp_path / "r")
    memory = [r for r in log if r.get("event") == "memory"]
    assert len(memory) == 1 and memory[0]["peak_saved_bytes"] > 0
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r)


def test_resume_refuses_other_settings(tmp_path):
    kw = dict(data="text", method="maml", inner_steps=1, steps=1)
    train.train(_settings(tmp_path, **kw))
    with pytest.raises(ValueError, match=r"other settings \{'lr'"):
        train.train(_settings(tmp_path, **{**kw, "lr": 0.5}))


def test_paper_defaults():
    s = train.PAPER
    assert (s["lr"], s["clip"], s["batch"], s["inner_lr"]) == (1e-5, 1.0, 8, 1e-2)
    assert (s["ratio"], s["bootstrap_steps"], s["bootstrap_weight"], s["bootstrap_lr"]) == (
        0.25,
        5,
        100.0,
        5e-2,
    )
    gradncp = train.make_config({**s, "method": "gradncp"})
    maml = train.make_config({**s, "method": "maml"})
    assert gradncp.inner_steps == 16 and gradncp.pruner.ratio == 0.25
    assert gradncp.bootstrap.steps == 5 and gradncp.bootstrap.weight == 100.0
    assert maml.inner_steps == 4 and maml.pruner is None and maml.bootstrap is None
    assert train.make_config({**s, "bootstrap_steps": 0}).bootstrap is None


def test_cli_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        train.main(["--smoke", "--ratio", "1.5"])
    assert "--ratio must be in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--smoke", "--steps", "0"])


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text_run")
    train.main(["--smoke", "--data", "text", "--inner-steps", "3", "--out", str(out)])
    return out


def test_evaluate_reports_rescaling_lrs_and_the_curve(text_run):
    res = evaluate.evaluate(
        str(text_run), test_steps=2, horizon=3, test_lrs=[0.05], signals_limit=2
    )
    assert set(res["variants"]) == {"lr=0.01", "lr=0.01 +rescale", "lr=0.05", "lr=0.05 +rescale"}
    base, rescaled = res["variants"]["lr=0.01"], res["variants"]["lr=0.01 +rescale"]
    assert set(base["curve"]) == {"0", "1", "2", "3"}
    assert base["curve"]["2"] == pytest.approx(base["psnr"])
    assert base["curve"]["0"] == rescaled["curve"]["0"]  # same start
    assert base["curve"]["2"] != rescaled["curve"]["2"]
    assert -1 <= base["ssim"] <= 1 and math.isfinite(base["psnr"])
    assert set(res["variants"]["lr=0.05"]["curve"]) == {"2"}
    saved = json.loads((text_run / "eval_trained.json").read_text())
    assert saved["variants"]["lr=0.01"]["psnr"] == base["psnr"]
    assert "PSNR@2" in evaluate.format_result(res)

    rand = evaluate.evaluate(str(text_run), test_steps=2, horizon=2, signals_limit=2, init="random")
    assert rand["outer_steps"] == 0 and rand["variants"]["lr=0.01"]["psnr"] != base["psnr"]


def test_rescale_config_gives_maml_a_pruner():
    maml = ncp.MetaConfig(inner_steps=4, pruner=None, bootstrap=None)
    cfg = evaluate.rescale_config(maml, 0.25)
    assert cfg.pruner.ratio == 0.25 and cfg.inner_steps == 4 and cfg.bootstrap is None
    gradncp = ncp.MetaConfig()
    assert evaluate.rescale_config(gradncp, 0.5) is gradncp


def test_figures_are_written(text_run, tmp_path):
    png = b"\x89PNG\r\n\x1a\n"
    path = figures.main(["pruning", "--run", str(text_run), "--out", str(tmp_path / "f1.png")])
    assert Path(path).read_bytes()[:8] == png
    evaluate.evaluate(str(text_run), test_steps=2, horizon=3, signals_limit=2)
    path = figures.main(["myopia", "--run", str(text_run), "--out", str(tmp_path / "f5.png")])
    assert Path(path).read_bytes()[:8] == png


def test_pruning_steps_record_k_steps_of_kept_points():
    torch.manual_seed(0)
    model = train.Siren(2, 3, hidden=8, layers=2)
    cfg = ncp.MetaConfig(inner_steps=3)
    x, y = torch.rand(2, 40, 2), torch.rand(2, 40, 3)
    kept, preds = figures.pruning_steps(model, cfg, x, y)
    assert kept.shape == (3, 2, 10) and len(preds) == 4
    whole = ncp.adapt(model, x, y, cfg, mode="pruned")
    torch.testing.assert_close(kept, whole.kept_indices)
    torch.testing.assert_close(preds[-1], ncp.forward(model, whole, x))
    with pytest.raises(ValueError, match="no pruner"):
        figures.pruning_steps(model, ncp.MetaConfig(pruner=None, bootstrap=None), x, y)


def _audio_root(tmp_path):
    import soundfile

    root = tmp_path / "audio"
    root.mkdir()
    for i in range(2):
        soundfile.write(root / f"{i}.flac", np.sin(np.arange(1_600) * (0.1 + i)) * 0.5, 16_000)
    return root


def _video_root(tmp_path):
    from tests.test_nf_data import _write_video

    root = tmp_path / "video"
    root.mkdir()
    _write_video(root / "a.avi", frames=12, w=16, h=16)
    return root


def _grid_file(tmp_path):
    from tests.test_nf_data import _write_netcdf

    path = tmp_path / "g.nc"
    _write_netcdf(path, np.random.default_rng(0).random((12, 6, 8)).astype(np.float32))
    return path


@pytest.mark.parametrize(
    ("data", "make_root", "extra"),
    [
        ("audio_folder", _audio_root, ["--model", "ffn"]),
        ("video_folder", _video_root, ["--layers", "2"]),
        ("grid_file", _grid_file, ["--variable", "T2M", "--grid-stride", "1"]),
    ],
)
def test_every_signal_kind_trains_and_evaluates(tmp_path, data, make_root, extra):
    root = make_root(tmp_path)
    out = tmp_path / "run"
    argv = ["--smoke", "--data", data, "--root", str(root), "--out", str(out)]
    argv += ["--method", "maml", "--inner-steps", "1", "--steps", "1", "--seconds", "0.02", *extra]
    result = train.main(argv)
    assert result["step"] == 1
    res = evaluate.main(
        ["--run", str(out), "--test-steps", "1", "--horizon", "2", "--signals", "2"]
    )
    v = res["variants"]["lr=0.01"]
    assert math.isfinite(v["psnr"]) and set(v["curve"]) == {"0", "1", "2"}
    assert ("ssim" in v) == (data == "video_folder")


def test_reproduce_commands_and_empty_report(tmp_path):
    cmds = reproduce.commands("text_gradncp", str(tmp_path))
    train_cmd = " ".join(cmds[0])
    assert "--method gradncp" in train_cmd and "--data text" in train_cmd
    assert "--ratio" not in train_cmd  # paper default 0.25 from train.PAPER
    assert len(reproduce.commands("speech_maml", str(tmp_path))) == 3  # + random init
    assert set(g for g, _, _ in reproduce.RUNS.values()) == set(reproduce.GROUPS)
    text = reproduce.report(str(tmp_path))
    assert "| text | MAML K=4 | - | not run |" in text


def test_reproduce_skips_finished_commands(tmp_path):
    train_cmd, eval_cmd, _ = reproduce.commands("speech_maml", str(tmp_path))
    run = tmp_path / "speech_maml"
    run.mkdir()
    assert not reproduce._done(train_cmd, str(run))  # no checkpoint yet
    (run / "checkpoint.pt").write_bytes(b"")
    steps = reproduce.COMMON["steps"]
    (run / "metrics.jsonl").write_text(json.dumps({"step": steps - 50, "event": "eval"}) + "\n")
    assert not reproduce._done(train_cmd, str(run))  # interrupted before the last step
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": steps, "event": "eval", "psnr": 1.0}) + "\n")
    assert reproduce._done(train_cmd, str(run))
    (run / "eval_trained.json").write_text("{}")
    os.utime(run / "eval_trained.json", (1, 1))  # older than the checkpoint: evaluate again
    assert not reproduce._done(eval_cmd, str(run))
    os.utime(run / "eval_trained.json", None)
    os.utime(run / "checkpoint.pt", (1, 1))
    assert reproduce._done(eval_cmd, str(run))
