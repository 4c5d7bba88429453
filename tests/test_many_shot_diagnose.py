"""The many-shot diagnosis script: batch-norm statistic gaps and the chunked bootstrap."""

from __future__ import annotations

import json
import math

import pytest
import torch

from examples.many_shot import diagnose
from examples.many_shot.train import train
from tests.test_many_shot_data import write_fashion
from tests.test_many_shot_train import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stat_gap_by_hand():
    # Four points, constant over channels and pixels: 0, 0, 2, 2 (mean 1, variance 1).
    full = torch.tensor([0.0, 0.0, 2.0, 2.0])[:, None, None, None].expand(4, 3, 2, 2)
    same = diagnose.stat_gap(full, full)
    assert same["mean_shift"] == pytest.approx(0.0, abs=1e-6)
    assert same["log_var_ratio"] == pytest.approx(0.0, abs=1e-6)
    # Keep 0, 2, 2: mean 4/3 (shift 1/3 of a std), variance 8/9.
    kept = diagnose.stat_gap(full, full[1:])
    assert kept["mean_shift"] == pytest.approx(1 / 3, rel=1e-4)
    assert kept["log_var_ratio"] == pytest.approx(abs(math.log(8 / 9)), rel=1e-4)


def test_diagnose_reports_every_subset_and_an_exact_bootstrap_at_full_chunk(tmp_path):
    write_fashion(tmp_path / "fashion")
    cfg = tiny(tmp_path, data="fashion", data_root=str(tmp_path / "fashion"), ways=3, ratio=0.34)
    train(cfg)
    out = tmp_path / "diag.json"
    argv = ["--run", cfg.out, "--episodes", "2", "--split", "val", "--out", str(out)]
    support = cfg.ways * cfg.shots
    result = diagnose.main([*argv, "--bootstrap-chunk", str(support)])
    assert json.loads(out.read_text()) == result
    for where in ("init", "adapted"):
        rows = result["batch_norm"][where]
        assert set(rows) == set(diagnose.SUBSETS)
        for r in rows.values():
            assert len([k for k in r if k.startswith("mean_shift")]) == 4  # Conv4's four layers
            assert -1.0 <= r["step_cosine"] <= 1.0 + 1e-6
    # One chunk holding the whole support set is the unchunked bootstrap, in either order.
    for order in ("sorted", "shuffled"):
        assert result["bootstrap"][order]["cosine_mean"] == pytest.approx(1.0, abs=1e-5)
        assert result["bootstrap"][order]["norm_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    halves = diagnose.main([*argv, "--bootstrap-chunk", str(support // 2)])["bootstrap"]
    # Per-chunk batch statistics change the target.
    assert halves["sorted"]["cosine_mean"] < 1.0 - 1e-6
    with pytest.raises(FileNotFoundError, match=r"checkpoint\.pt not found"):
        diagnose.main(["--run", str(tmp_path / "none")])
