"""examples/neural_fields train / evaluate / figures / reproduce end to end in smoke mode, and
exact resumption from a checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
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
from examples.neural_fields import datasets, evaluate, figures, reproduce, train
from examples.neural_fields.metrics import psnr


def _settings(out, **kw):
    return {**train.PAPER, **train.SMOKE, "out": str(out), **kw}


def _log_losses(out):
    return [(r["step"], r["loss"], r["query_loss"]) for r in train.read_log(out) if "loss" in r]


def test_resume_after_interruption_is_exact(tmp_path):
    kw = dict(
        data="text", score="random", inner_steps=2, outer_steps=2, ckpt_every=100, eval_every=100
    )
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
    assert set(res["variants"]) == {"learned lr", "learned lr +rescale", "learned lr pruned"}
    assert set(res["variants"]["learned lr"]["curve"]) == {"0", "1", "2"}


def test_resume_moved_the_parameters(tmp_path):
    kw = dict(data="text", method="maml", inner_steps=1, outer_steps=2)
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
    kw = dict(data="text", method="maml", inner_steps=1, outer_steps=1)
    train.train(_settings(tmp_path, **kw))
    with pytest.raises(ValueError, match=r"other settings \(outer_lr: 1e-05 -> 0\.5"):
        train.train(_settings(tmp_path, **{**kw, "outer_lr": 0.5}))


def test_paper_defaults():
    s = train.PAPER
    assert (s["outer_lr"], s["clip"], s["batch"], s["inner_lr"]) == (1e-5, 1.0, 8, 1e-2)
    assert (s["bootstrap_steps"], s["bootstrap_weight"], s["bootstrap_lr"]) == (5, 100.0, 5e-2)
    gradncp = train.make_config({**s, "method": "gradncp"})
    maml = train.make_config({**s, "method": "maml"})
    assert gradncp.inner_steps == 16 and gradncp.pruner.ratio == 0.25
    assert gradncp.bootstrap.steps == 5 and gradncp.bootstrap.weight == 100.0
    assert maml.inner_steps == 4 and maml.pruner is None and maml.bootstrap is None
    assert train.make_config({**s, "bootstrap_steps": 0}).bootstrap is None


@pytest.mark.parametrize(
    ("data", "ratio", "k"),
    [
        ("text", 0.25, 16),
        ("photos", 0.25, 16),
        ("speech", 0.5, 8),
        ("audio_folder", 0.5, 8),
        ("climate", 0.5, 8),
        ("grid_file", 0.5, 8),
        ("video", 0.25, 16),
    ],
)
def test_per_data_paper_ratio_and_equal_memory_k(data, ratio, k):
    # Appendix A.2: ratio 0.5 for LibriSpeech and ERA5, 0.25 otherwise; GradNCP's K is MAML's
    # K (4) divided by the ratio
    cfg = train.make_config({**train.PAPER, "data": data, "method": "gradncp"})
    assert (cfg.pruner.ratio, cfg.inner_steps) == (ratio, k)
    assert train.make_config({**train.PAPER, "data": data, "method": "maml"}).inner_steps == 4
    # an explicit ratio or K wins, and K follows an explicit ratio
    s = {**train.PAPER, "data": data, "method": "gradncp", "ratio": 0.1}
    assert train.make_config(s).inner_steps == 40
    assert train.make_config({**s, "inner_steps": 16}).inner_steps == 16


def test_w0_is_50_on_the_sphere_only():
    s = {**train.PAPER, **train.SMOKE}
    for data, w0 in (("climate", 50.0), ("text", 30.0), ("speech", 30.0)):
        signals = train.load_data({**s, "data": data})
        assert train.make_model(s, signals).net[1].w0 == w0, data


def test_settings_resolve_the_ratio_before_saving(tmp_path):
    parser = __import__("argparse").ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--smoke", "--data", "climate", "--method", "gradncp"])
    s = train.settings_from(args, parser)
    assert (s["ratio"], s["inner_steps"]) == (0.5, 8)


def test_cli_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        train.main(["--smoke", "--ratio", "1.5"])
    assert "--ratio must be in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--smoke", "--outer-steps", "0"])


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text_run")
    train.main(["--smoke", "--data", "text", "--inner-steps", "3", "--out", str(out)])
    return out


def test_evaluate_reports_rescaling_lrs_and_the_curve(text_run):
    res = evaluate.evaluate(
        str(text_run), test_steps=2, horizon=3, test_lrs=[0.05], signals_limit=2
    )
    assert set(res["variants"]) == {
        "lr=0.01",
        "lr=0.01 +rescale",
        "lr=0.01 pruned",
        "lr=0.05",
        "lr=0.05 +rescale",
    }
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


def test_pruned_column_adapts_on_the_kept_points(text_run):
    # Figure 11: steps on the pruned context, PSNR measured on the full context
    res = evaluate.evaluate(str(text_run), test_steps=2, horizon=2, signals_limit=2)
    pruned = res["variants"]["lr=0.01 pruned"]
    assert pruned["pruned"] and not pruned["rescale"]
    assert res["pruner_ratio"] == 0.25
    r = evaluate.load_run(str(text_run))
    model, cfg, signals = r["model"], r["config"], r["signals"]
    x, y = signals.context(signals.test[:2])
    adapted = ncp.adapt(model, x, y, cfg, steps=2, mode="pruned")
    assert adapted.kept_indices.shape[-1] == round(0.25 * x.shape[1])
    with torch.no_grad():
        pred = ncp.forward(model, adapted.params, x).clamp(0, 1)
    expected = psnr(pred, y, signals.data_range).mean().item()
    assert pruned["psnr"] == pytest.approx(expected, rel=1e-5)
    assert pruned["psnr"] != res["variants"]["lr=0.01"]["psnr"]


def test_evaluate_can_rank_in_another_score_dtype(text_run):
    # a float32-trained run ranked in bfloat16 at test time: its own file, the plain variant
    # untouched, the pruned variant what adapting with a bfloat16-scoring pruner gives
    f32 = evaluate.evaluate(str(text_run), test_steps=2, horizon=2, signals_limit=2)
    bf16 = evaluate.main(
        [
            "--run",
            str(text_run),
            "--test-steps",
            "2",
            "--horizon",
            "2",
            "--signals",
            "2",
            "--score-dtype",
            "bfloat16",
        ]
    )
    assert (text_run / "eval_trained_score_bfloat16.json").is_file()
    assert bf16["score_dtype"] == "bfloat16" and f32["score_dtype"] == "float32"
    assert bf16["variants"]["lr=0.01"]["psnr"] == f32["variants"]["lr=0.01"]["psnr"]
    r = evaluate.load_run(str(text_run))
    model, signals = r["model"], r["signals"]
    cfg = train.make_config({**r["settings"], "score_dtype": "bfloat16"})
    assert cfg.pruner.score_dtype == torch.bfloat16
    x, y = signals.context(signals.test[:2])
    adapted = ncp.adapt(model, x, y, cfg, steps=2, mode="pruned")
    with torch.no_grad():
        pred = ncp.forward(model, adapted.params, x).clamp(0, 1)
    expected = psnr(pred, y, signals.data_range).mean().item()
    assert bf16["variants"]["lr=0.01 pruned"]["psnr"] == pytest.approx(expected, rel=1e-5)
    maml = evaluate.rescale_config(
        ncp.MetaConfig(pruner=None, bootstrap=None), 0.25, score_dtype=torch.bfloat16
    )
    assert maml.pruner.score_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="`score_dtype` must be one of"):
        evaluate.evaluate(str(text_run), score_dtype="float16")


def test_maml_rescale_ratio_defaults_to_the_data_sets_paper_ratio(tmp_path):
    out = tmp_path / "climate_maml"
    argv = ["--smoke", "--data", "grid_file", "--root", str(_grid_file(tmp_path))]
    argv += ["--variable", "T2M", "--grid-stride", "1"]
    train.main([*argv, "--method", "maml", "--out", str(out)])
    res = evaluate.evaluate(str(out), test_steps=1, horizon=1, signals_limit=1)
    assert res["pruner_ratio"] == 0.5 and "lr=0.01 pruned" in res["variants"]
    res = evaluate.evaluate(str(out), test_steps=1, horizon=1, signals_limit=1, rescale_ratio=0.1)
    assert res["pruner_ratio"] == 0.1
    with pytest.raises(SystemExit):
        evaluate.main(["--run", str(out), "--rescale-ratio", "2"])


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
    torch.testing.assert_close(preds[-1], ncp.forward(model, whole.params, x))
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
    argv += [
        "--method",
        "maml",
        "--inner-steps",
        "1",
        "--outer-steps",
        "1",
        "--seconds",
        "0.02",
        *extra,
    ]
    result = train.main(argv)
    assert result["step"] == 1
    res = evaluate.main(
        ["--run", str(out), "--test-steps", "1", "--horizon", "2", "--signals", "2"]
    )
    v = res["variants"]["lr=0.01"]
    assert math.isfinite(v["psnr"]) and set(v["curve"]) == {"0", "1", "2"}
    assert ("ssim" in v) == (data == "video_folder")


def test_reproduce_commands_carry_the_paper_settings_and_the_seed(tmp_path):
    cmds = reproduce.commands("text_gradncp", str(tmp_path), seed=2)
    train_cmd = " ".join(cmds[0])
    assert "--method gradncp" in train_cmd and "--data text" in train_cmd
    assert "--ratio 0.25 --inner-steps 16" in train_cmd and "--seed 2" in train_cmd
    assert f"--out {tmp_path / 'text_gradncp_s2'}" in train_cmd
    for data in ("speech", "climate"):  # the paper's 0.5 for LibriSpeech and ERA5, K = 4 / 0.5
        flags = " ".join(reproduce.commands(f"{data}_gradncp", str(tmp_path))[0])
        assert "--ratio 0.5 --inner-steps 8" in flags, data
        flags = " ".join(reproduce.commands(f"{data}_maml", str(tmp_path))[0])
        assert "--method maml --inner-steps 4" in flags and "--ratio" not in flags
    ratio = " ".join(reproduce.commands("text_ratio0.1", str(tmp_path))[0])
    assert "--ratio 0.1 --inner-steps 16" in ratio  # the paper's ablations keep K = 16
    assert len(reproduce.commands("speech_maml", str(tmp_path))) == 3  # + random init
    assert set(g for g, _, _ in reproduce.RUNS.values()) == set(reproduce.GROUPS)
    text = reproduce.report(str(tmp_path))
    assert "| text | MAML K=4 | 0 | - | not run |" in text
    assert "| climate | GradNCP K=8 r=0.5 | 0 |" in text


def test_reproduce_runs_every_seed_in_its_own_folder(tmp_path):
    printed = reproduce.main(
        ["commands", "--runs", "climate_maml", "--seeds", "0", "1", "2", "--out", str(tmp_path)]
    )
    lines = printed.splitlines()
    assert len(lines) == 9  # train, evaluate, evaluate the random init; three seeds
    for seed in (0, 1, 2):
        assert sum(f"climate_maml_s{seed} " in line for line in lines) == 3
        assert sum(f"--seed {seed}" in line for line in lines) == 1


def test_mean_ci_is_student_t():
    mean, half = reproduce.mean_ci([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.3027; sd = 1; half-width = 4.3027 / sqrt(3)
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert reproduce.mean_ci([5.0]) == (5.0, None)
    assert reproduce.cell([5.0]) == "5.00 (1 seed)" and reproduce.cell([]) == "not run"
    assert reproduce.cell([1.0, 2.0, 3.0]) == "2.00 ± 2.48"
    with pytest.raises(ValueError, match="empty"):
        reproduce.mean_ci([])


def test_report_pools_the_seeds(tmp_path):
    for seed, value in enumerate((30.0, 32.0, 34.0)):
        run = tmp_path / f"text_gradncp_s{seed}"
        run.mkdir()
        variants = {
            v: {"psnr": value + i, "curve": {"4": value - 10, "16": value + i}}
            for i, v in enumerate(("lr=0.01", "lr=0.01 +rescale", "lr=0.01 pruned"))
        }
        (run / "eval_trained.json").write_text(json.dumps({"variants": variants}))
    (tmp_path / "text_gradncp_s0_old").mkdir()  # not a seed folder of this run
    assert reproduce.values(str(tmp_path), "text_gradncp", "lr=0.01 pruned") == [32.0, 34.0, 36.0]
    text = reproduce.report(str(tmp_path))
    half = f"{4.302653 * 2 / math.sqrt(3):.2f}"
    row = f"| text | GradNCP K=16 r=0.25 | 3 | - | 32.00 ± {half} | - | 33.00 ± {half} "
    assert row + f"| 34.00 ± {half} |" in text
    assert "| text | gradncp pruned | 22.00 ± " in text  # PSNR@4 of the pruned curve


def test_fell_counts_seeds_that_ended_below_their_best(tmp_path):
    for seed, evals in enumerate(([30.0, 36.0, 33.5], [30.0, 36.0, 32.9], [31.0, 35.0, 40.0])):
        run = tmp_path / f"climate_gradncp_s{seed}"
        run.mkdir()
        lines = [{"step": 0, "event": "memory", "peak_saved_bytes": 1}]
        lines += [{"step": 100 * i, "event": "eval", "psnr": p} for i, p in enumerate(evals)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert reproduce.fell(str(tmp_path), "climate_gradncp") == "1 of 3"  # 36.0 -> 32.9 only
    assert reproduce.fell(str(tmp_path), "climate_gradncp", drop=2.0) == "2 of 3"
    assert reproduce.fell(str(tmp_path), "climate_maml") == "-"


def test_reproduce_rejects_bad_options(capsys):
    for argv, message in (
        (["run", "--set", "outer_steps"], "KEY=VALUE"),
        (["run", "--set", "stepz=3"], "KEY=VALUE"),
        (["run", "--set", "outer_steps=many"], "needs a int value, got 'many'"),
        (["run", "--runs", "nope"], "not runs of preset 'cpu'"),
        (["run", "--root", "x"], "--root is for --preset gpu"),
        (["run", "--seeds", "-1"], "--seeds must be >= 0"),
        (["run", "--preset", "gpu", "--only", "table1"], "with gpu use --runs"),
    ):
        with pytest.raises(SystemExit):
            reproduce.main(argv)
        assert message in capsys.readouterr().err, argv


def test_size64_preset_is_the_papers_siren_on_bigger_signals(tmp_path):
    cmds = [
        " ".join(reproduce.commands(n, str(tmp_path), preset="size64")[0])
        for n in reproduce.SIZE64_RUNS
    ]
    assert len(cmds) == 6
    assert all("--hidden 256 --layers 5" in c and "--resolution 64" in c for c in cmds)
    assert all("--outer-lr 0.0001 " in c for c in cmds)  # 1e-3 collapsed GradNCP at this size
    speech = [c for c in cmds if "--data speech" in c]
    assert all("--seconds 1.0 " in c and "--audio-bound 50.0" in c for c in speech)
    assert "--ratio 0.5 --inner-steps 8" in speech[1]
    # 1 s clips are 16,000 points: half the images' outer steps, each flag given once
    assert all("--outer-steps 100 " in c and c.count("--outer-steps") == 1 for c in speech)
    assert all("--outer-steps 200 " in c for c in cmds if c not in speech)


def test_gpu_preset_runs_tiny_on_cpu_and_writes_its_row(tmp_path):
    from PIL import Image

    root = tmp_path / "faces"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"{i}.png")
    out = tmp_path / "gpu"
    tiny = ["outer_steps=2", "resolution=16", "hidden=16", "layers=2", "batch=2", "eval_every=2"]
    tiny += ["eval_signals=1", "ckpt_every=2", "test_steps=2"]
    cmds = reproduce.commands("deep_sky178_gradncp", str(out), preset="gpu", device="cuda")
    full = " ".join(cmds[0])
    assert "--resolution 178 --test-steps 16" in full and "--hidden 256 --layers 5" in full
    assert "--inner-steps 16" in full and "--device cuda" in full and "--batch 8" in full
    assert "--device cuda" in " ".join(cmds[1])
    argv = ["run", "--preset", "gpu", "--device", "cpu", "--seeds", "0", "--out", str(out)]
    printed = reproduce.main([*argv, "--root", str(root), "--set", *tiny])
    table = (out / reproduce.GPU_TABLE).read_text()
    assert table.strip() == printed.strip()
    header, _, row = table.strip().splitlines()
    assert "MAML K=4 | GradNCP K=16 | GradNCP +rescale | GradNCP pruned" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0].startswith("image_folder (image 16x16x3)") and cells[1:3] == ["2", "1"]
    assert all(c.endswith("(1 seed)") for c in cells[3:7]), cells
    saved = cells[7].split(" / ")
    assert len(saved) == 2 and all(float(v) >= 0 for v in saved) and cells[8] == "- / -"
    res = json.loads((out / "deep_sky178_gradncp_s0" / "eval_trained.json").read_text())
    assert res["outer_steps"] == 2 and res["inner_steps"] == 16


def test_reproduce_skips_finished_commands(tmp_path):
    train_cmd, eval_cmd, _ = reproduce.commands("speech_maml", str(tmp_path))
    run = tmp_path / "speech_maml_s0"
    run.mkdir()
    assert not reproduce._done(train_cmd, str(run))  # no checkpoint yet
    (run / "checkpoint.pt").write_bytes(b"")
    steps = reproduce.COMMON["outer_steps"]
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


def test_gradnorm_ratio_of_pruned_to_full_gradient(text_run):
    from examples.neural_fields import gradnorm

    torch.manual_seed(0)
    model = train.Siren(2, 1, hidden=8, layers=2)
    x, y = torch.rand(2, 40, 2), torch.rand(2, 40, 1)
    torch.testing.assert_close(gradnorm.grad_ratios(model, x, y, 1.0, 2), torch.ones(2, 2))
    r = gradnorm.grad_ratios(model, x, y, 0.5, 1)
    cfg = ncp.MetaConfig(inner_steps=1, pruner=ncp.ContextPruner(ratio=0.5), bootstrap=None)
    kept = ncp.adapt(model, x, y, cfg, mode="pruned").kept_indices[0]
    for t in range(2):  # by hand: the same norms with torch.autograd on the module itself
        full = ((model(x[t]) - y[t]) ** 2).mean()
        pruned = ((model(x[t, kept[t]]) - y[t, kept[t]]) ** 2).mean()
        gf = torch.autograd.grad(full, list(model.parameters()))
        gp = torch.autograd.grad(pruned, list(model.parameters()))
        norm = lambda gs: torch.sqrt(sum((g**2).sum() for g in gs))  # noqa: E731
        assert r[0, t].item() == pytest.approx((norm(gp) / norm(gf)).item(), rel=1e-5)
    lines = gradnorm.main(
        ["--run", str(text_run), "--ratios", "0.5", "--inner-steps", "2", "--signals", "2"]
    )
    assert lines[1].startswith("ratio 0.5 (at most 2): ") and "| max " in lines[1]
    with pytest.raises(SystemExit):
        gradnorm.main(["--run", str(text_run), "--ratios", "0"])


def test_time_to_quality_excludes_evaluation_time(tmp_path):
    flags = ["--smoke", "--data", "text", "--outer-steps", "4", "--eval-every", "1"]
    for method in ("maml", "gradncp"):
        train.main([*flags, "--method", method, "--out", str(tmp_path / method)])
    log = train.read_log(tmp_path / "gradncp")
    evals = [r for r in log if r.get("event") == "eval"]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3, 4]
    train_s = [r["train_seconds"] for r in evals]
    assert train_s == sorted(train_s) and train_s[0] > 0
    # meta-training time only: below the wall clock, which includes the evaluations
    assert steps[-1]["train_seconds"] < steps[-1]["seconds"]
    runs = [str(tmp_path / "maml"), str(tmp_path / "gradncp")]
    curves, target, reached = figures.time_to_quality(runs)
    assert set(curves) == {"maml K=4", "gradncp K=16 r=0.25"}
    assert target == min(max(p for _, p in pts) for pts in curves.values())
    for label, t in reached.items():
        assert t is not None and any(s == t and p >= target for s, p in curves[label])
    path = figures.main(
        ["time", "--run", runs[0], "--run", runs[1], "--out", str(tmp_path / "t.png")]
    )
    assert os.path.getsize(path) > 0


def test_bootstrap_context_and_chunk_flags_reach_the_config():
    s = {**train.PAPER, "data": "text", "method": "gradncp"}
    cfg = train.make_config({**s, "bootstrap_context": "pruned", "bootstrap_chunk": 64})
    assert cfg.bootstrap.context == "pruned" and cfg.bootstrap.chunk_size == 64
    assert train.make_config(s).bootstrap.context == "full"
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--bootstrap-context", "random", "--bootstrap-chunk", "8"])
    got = train.settings_from(args, parser)
    assert (got["bootstrap_context"], got["bootstrap_chunk"]) == ("random", 8)


def test_score_dtype_flag_reaches_the_pruner_and_the_reproduce_command():
    s = {**train.PAPER, "data": "text", "method": "gradncp"}
    assert train.make_config(s).pruner.score_dtype is None
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    got = train.settings_from(parser.parse_args(["--score-dtype", "bfloat16"]), parser)
    assert train.make_config({**s, **got}).pruner.score_dtype is torch.bfloat16
    cmd = reproduce.commands("text_gradncp_bf16", "runs")[0]
    assert cmd[cmd.index("--score-dtype") + 1] == "bfloat16"


def test_reptile_gradient_is_theta0_minus_the_mean_adapted_parameters(tmp_path):
    torch.manual_seed(0)
    model = train.Siren(2, 3, hidden=8, layers=2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(3, 20, 2, generator=g), torch.rand(3, 20, 3, generator=g)
    cfg = train.make_config({**train.PAPER, "method": "reptile", "inner_steps": 3})
    assert cfg.first_order and cfg.pruner is None and cfg.inner_steps == 3
    losses = train.reptile_step(model, x, y, cfg)
    adapted = ncp.adapt(model, x, y, cfg).params
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, p.detach() - adapted[name].mean(0))
    assert losses.shape == (3,)
    out = tmp_path / "reptile"
    flags = ["--smoke", "--data", "text", "--method", "reptile", "--inner-steps", "2"]
    done = train.main([*flags, "--out", str(out)])
    assert done["step"] == 2 and any("loss" in r for r in train.read_log(out))
    with pytest.raises(SystemExit):
        train.main([*flags, "--learned-lr", "step", "--out", str(tmp_path / "x")])


def test_images_become_one_frame_clips_for_a_video_model():
    images = torch.rand(2, 4, 5, 3)
    signal_set = datasets.SignalSet("img", "image", lambda i: images, 2, images)
    plain_x, plain_y = signal_set.context(images)
    clip = dataclasses.replace(signal_set, frame_time=0.0)
    x, y = clip.context(images)
    assert clip.in_features == 3 and x.shape == (2, 20, 3)
    assert torch.equal(x[..., 0], torch.zeros(2, 20)) and torch.equal(x[..., 1:], plain_x)
    assert torch.equal(y, plain_y)


def test_cross_domain_adapts_a_video_run_to_images(tmp_path):
    """Table 10: the video initialisation adapted to an image stand-in's test signals."""
    out = tmp_path / "run"
    argv = ["--smoke", "--data", "video_folder", "--root", str(_video_root(tmp_path))]
    argv += ["--out", str(out), "--method", "maml", "--inner-steps", "1", "--outer-steps", "1"]
    train.main([*argv, "--layers", "2"])
    own = evaluate.main(
        ["--run", str(out), "--test-steps", "1", "--horizon", "1", "--signals", "2"]
    )
    res = evaluate.main(
        ["--run", str(out), "--test-steps", "1", "--horizon", "1", "--signals", "2", "--on", "text"]
    )
    assert res["trained_on"] == "video_folder" and res["data"].startswith("text (image")
    assert (out / "eval_trained_on_text.json").is_file()  # the run's own result is kept
    with open(out / "eval_trained.json") as f:
        assert json.load(f)["variants"] == own["variants"]
    v = res["variants"]["lr=0.01"]
    assert math.isfinite(v["psnr"]) and v["psnr"] != own["variants"]["lr=0.01"]["psnr"]
    with pytest.raises(ValueError, match="`on`='speech' has 1-D points"):
        evaluate.evaluate(str(out), test_steps=1, horizon=1, signals_limit=2, on="speech")


def test_reproduce_adds_the_cross_domain_evaluations_to_the_video_runs(tmp_path):
    cmds = reproduce.commands("video_gradncp", str(tmp_path), seed=1)
    targets = [c[c.index("--on") + 1] for c in cmds if "--on" in c]
    assert targets == list(reproduce.CROSS_DOMAIN)
    assert all(c[c.index("--horizon") + 1] == "16" for c in cmds if "--on" in c)
    assert not any("--on" in c for c in reproduce.commands("text_gradncp", str(tmp_path)))
    for name, psnrs in (("video_maml", (20.0, 21.0)), ("video_gradncp", (22.5, 22.0))):
        for seed, value in enumerate(psnrs):
            run = tmp_path / f"{name}_s{seed}"
            run.mkdir()
            with open(run / "eval_trained_on_photos.json", "w") as f:
                json.dump({"variants": {"lr=0.01": {"psnr": value}}}, f)
    row = next(
        line
        for line in reproduce.report(str(tmp_path)).splitlines()
        if "| photos (one-frame clips) |" in line
    )
    assert reproduce.cell([2.5, 1.0]) in row and row.endswith("| 2 |")
