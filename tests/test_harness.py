"""examples/harness.py: the run folder the example scripts share (checkpoints, resume, log)."""

from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch

from examples import harness
from examples.distributed import train_ddp
from examples.many_shot import train as many_shot
from examples.neural_fields import train as neural_fields


def _draws(gen: torch.Generator):
    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),
        [random.random() for _ in range(3)],
        torch.rand(3, generator=gen).tolist(),
    )


def test_checkpoint_round_trip_restores_every_random_state(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    _draws(gen)
    path = tmp_path / "checkpoint.pt"
    harness.save_checkpoint({"rng": harness.rng_state("cpu", sampler=gen), "settings": {}}, path)
    expected = _draws(gen)
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    state = harness.load_checkpoint(path)
    harness.set_rng_state(state["rng"], "cpu", sampler=gen)
    assert _draws(gen) == expected


def test_upgrade_renames_the_old_spellings_and_keeps_the_new_ones():
    old = {"steps": 5, "lr": 0.1, "boot_chunk": 62, "run_dir": "r", "seed": 1}
    assert harness.upgrade(old) == {
        "outer_steps": 5,
        "outer_lr": 0.1,
        "bootstrap_chunk": 62,
        "out": "r",
        "seed": 1,
    }
    assert harness.upgrade({"steps": 5, "outer_steps": 7}) == {"outer_steps": 7}


def test_an_old_many_shot_checkpoint_loads_with_its_settings_upgraded(tmp_path):
    path = tmp_path / "checkpoint.pt"
    old = {"config": {"boot_lr": 0.5, "run_dir": "x"}, "rng": {"torch": torch.get_rng_state()}}
    torch.save(old, path)
    state = harness.load_checkpoint(path)
    assert state["settings"] == {"bootstrap_lr": 0.5, "out": "x"}
    harness.set_rng_state(state["rng"])  # no numpy or Python state in that format: fine
    assert torch.equal(torch.get_rng_state(), old["rng"]["torch"])


def test_a_pickled_checkpoint_is_refused_until_trusted(tmp_path):
    path = tmp_path / "checkpoint.pt"
    np.random.seed(4)
    torch.save({"settings": {"lr": 0.1}, "rng": {"numpy": np.random.get_state()}}, path)
    with pytest.raises(ValueError, match=r"pickled Python objects.*examples\.harness trust"):
        harness.load_checkpoint(path)
    harness.main(["trust", str(path)])
    state = harness.load_checkpoint(path)
    assert state["settings"] == {"outer_lr": 0.1}
    expected = np.random.rand(2)
    np.random.seed(0)
    harness.set_rng_state({"torch": torch.get_rng_state(), **state["rng"]})
    assert np.random.rand(2).tolist() == expected.tolist()


def test_check_resume_is_an_allow_list():
    saved = {"outer_steps": 10, "ratio": 0.25}
    harness.check_resume(
        saved, {"outer_steps": 20, "ratio": 0.25}, may_change=["outer_steps"], path="p"
    )
    with pytest.raises(ValueError, match=r"p was written with other settings \(ratio: 0.25 -> 0.5"):
        harness.check_resume(saved, {"outer_steps": 10, "ratio": 0.5}, may_change=[], path="p")
    # a setting the checkpoint predates compares as its default
    now = {"outer_steps": 10, "ratio": 0.25, "new": 1}
    harness.check_resume(saved, now, may_change=[], path="p", defaults={"new": 1})
    with pytest.raises(ValueError, match=r"new: 1 -> 2"):
        harness.check_resume(saved, {**now, "new": 2}, may_change=[], path="p", defaults={"new": 1})


def test_metrics_log_truncates_after_a_checkpoint(tmp_path):
    log = harness.MetricsLog(tmp_path / "metrics.jsonl")
    assert log.records() == []
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": float(step)})
    log.truncate(2)
    assert [r["step"] for r in log.records()] == [1, 2]
    log.clear()
    assert log.records() == []


def _flags(add) -> set:
    parser = argparse.ArgumentParser()
    add(parser)
    return {s for a in parser._actions for s in a.option_strings}


SHARED = {
    "--out",
    "--seed",
    "--device",
    "--threads",
    "--log-every",
    "--ckpt-every",
    "--restart",
    "--outer-steps",
    "--outer-lr",
    "--inner-steps",
    "--inner-lr",
    "--bootstrap-steps",
    "--bootstrap-lr",
    "--bootstrap-weight",
}


def test_the_training_scripts_spell_the_shared_flags_alike():
    nf = _flags(neural_fields.add_arguments)
    ms = _flags(many_shot.add_arguments)
    assert not SHARED - nf and not SHARED - ms, (SHARED - nf, SHARED - ms)
    ddp = set(vars(train_ddp.parse_args([])))  # train_ddp builds its parser inside parse_args
    assert {"outer_steps", "outer_lr", "inner_steps", "bootstrap_steps", "out", "restart"} <= ddp
    for old in ("--steps", "--lr", "--run-dir", "--boot-steps", "--boot-lr", "--boot-chunk"):
        assert old not in nf | ms, old


def test_neural_fields_refuses_an_unknown_setting_naming_its_new_spelling(tmp_path):
    settings = {**neural_fields.PAPER, **neural_fields.SMOKE, "out": str(tmp_path), "steps": 3}
    with pytest.raises(ValueError, match=r"\['steps'\] \(steps is now outer_steps\)"):
        neural_fields.train(settings)
