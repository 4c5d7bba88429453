"""MAML against GradNCP (global and class-balanced pruning) at equal memory, over several seeds:
the paper's Table 12 protocol.

Run from the repository root::

    python -m examples.many_shot.compare --data glyphs --ways 5 --shots 100 --seeds 0 1 2 \\
        --fit-memory --out runs/many_shot/glyphs-5w100s

Takes every flag of :mod:`examples.many_shot.train` (``--method`` excepted; ``--out`` is the folder of the comparison)
and runs each arm (``maml``, ``gradncp``: the paper's global top-k, ``gradncp-balanced``:
``--balance``) and seed in ``OUT/ARM-sSEED`` (a rerun resumes unfinished runs and reuses
finished ones), then writes ``OUT/summary.json`` and ``OUT/summary.md``: per arm and per
evaluation mode, the validation and test accuracy of each seed, their mean, standard deviation
and 95 % confidence interval over seeds, and the headline mode, the one with the best mean
validation accuracy (never chosen on test). With ``--fit-memory`` GradNCP keeps the paper's
horizon ``maml_steps / ratio`` and, when the measured saved bytes of one outer step exceed
MAML's, its bootstrap is chunked until they fit (:func:`budget.fit_bootstrap_chunk`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from scipy import stats

from .. import harness
from .budget import fit_bootstrap_chunk
from .episodes import EpisodeSampler
from .model import build_model
from .train import (
    EVAL_MODES,
    RunConfig,
    add_arguments,
    config_from_args,
    learned_lr,
    load_splits,
    meta_config,
)
from .train import run as run_one

# The compared arms: a method and its pruning rule.
ARMS: Dict[str, Dict[str, Any]] = {
    "maml": {"method": "maml", "balance": False},
    "gradncp": {"method": "gradncp", "balance": False},
    "gradncp-balanced": {"method": "gradncp", "balance": True},
}


def arm_config(base: RunConfig, arm: str, seed: int, out: Path) -> RunConfig:
    """The run configuration of ``arm`` and ``seed`` under ``out``."""
    if arm not in ARMS:
        raise ValueError(f"`--arms` entries must be in {list(ARMS)}, got {arm!r}.")
    return dataclasses.replace(base, **ARMS[arm], seed=seed, out=str(out / f"{arm}-s{seed}"))


def fit_memory(cfg: RunConfig, slack: float = 0.01) -> Dict[str, Any]:
    """Measure MAML's and GradNCP's saved bytes (GradNCP at ``cfg``'s horizon, global top-k)
    on one training episode and the bootstrap chunk that makes GradNCP fit; see
    :func:`examples.many_shot.budget.fit_bootstrap_chunk`."""
    splits = load_splits(cfg)
    device = torch.device(cfg.device)
    model = build_model(cfg.ways, cfg.channels, cfg.hidden, cfg.image_size, cfg.norm, cfg.seed)
    model = model.to(device)
    sampler = EpisodeSampler(splits["train"], cfg.ways, cfg.shots, cfg.queries, seed=cfg.seed)
    batch = sampler.sample(1).to(device).batch()
    gradncp = dataclasses.replace(cfg, method="gradncp", balance=False)
    out = fit_bootstrap_chunk(
        model,
        batch,
        meta_config(cfg, "maml"),
        meta_config(gradncp),
        learned_lr=(learned_lr(cfg, model, "maml"), learned_lr(gradncp, model)),
        slack=slack,
    )
    out["maml_steps"] = cfg.maml_steps
    out["gradncp_steps"] = gradncp.horizon
    return out


def seed_stats(values: Sequence[float]) -> Dict[str, Any]:
    """Mean, sample standard deviation and the half-width of the 95 % Student-t confidence
    interval over seeds (``t_{0.975, n-1} * std / sqrt(n)``; None for one seed)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return {"mean": float(v.mean()), "std": None, "ci95": None, "n": int(v.size)}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, v.size - 1) * std / np.sqrt(v.size))
    return {"mean": float(v.mean()), "std": std, "ci95": half, "n": int(v.size)}


def summarise(results: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    """Per arm: every (split, mode) over seeds, the headline mode chosen on validation, and the
    class coverage of the pruned steps."""
    out: Dict[str, Any] = {}
    for arm, runs in results.items():
        evals = [r.get("eval", {}) for r in runs]
        splits = [s for s in ("val", "test") if all(s in e for e in evals)]
        table: Dict[str, Dict[str, Any]] = {}
        for split in splits:
            modes = [m for m in EVAL_MODES if all(m in e[split] for e in evals)]
            table[split] = {
                mode: {
                    **seed_stats([e[split][mode]["mean"] for e in evals]),
                    "seeds": [e[split][mode]["mean"] for e in evals],
                    "episode_ci95": [e[split][mode]["ci95"] for e in evals],
                    "episodes": evals[0][split][mode]["episodes"],
                }
                for mode in modes
            }
        headline = None
        if table.get("val"):
            headline = max(table["val"], key=lambda m: table["val"][m]["mean"])
        covers = [r["training_coverage"] for r in runs if r.get("training_coverage")]
        test_cover = [
            e["test"]["pruned"]["coverage"]
            for e in evals
            if "test" in e and "pruned" in e["test"] and e["test"]["pruned"].get("coverage")
        ]
        out[arm] = {
            "inner_steps": runs[0]["inner_steps"],
            "test_steps": runs[0]["test_steps"],
            "outer_steps": runs[0]["settings"]["outer_steps"],
            "bootstrap_chunk": runs[0]["settings"].get("bootstrap_chunk"),
            "saved_bytes_per_task": runs[0]["saved_bytes_per_task"],
            "seeds": [r["settings"]["seed"] for r in runs],
            "eval": table,
            "headline_mode": headline,
            "headline_test": None
            if headline is None or headline not in table.get("test", {})
            else table["test"][headline],
            "training_coverage": None
            if not covers
            else {k: float(np.mean([c[k] for c in covers])) for k in ("missing", "min_share")},
            "test_pruned_coverage": None
            if not test_cover
            else {k: float(np.mean([c[k] for c in test_cover])) for k in ("missing", "min_share")},
            "train_seconds": [r["train_seconds"] for r in runs],
        }
    base = out.get("maml")
    for arm, entry in out.items():
        entry["vs_maml"] = None
        if arm == "maml" or base is None:
            continue
        mine, theirs = entry["headline_test"], base["headline_test"]
        if mine is None or theirs is None or entry["seeds"] != base["seeds"]:
            continue
        # Paired by seed (and by the shared test episodes): each arm's headline minus MAML's.
        diffs = [a - b for a, b in zip(mine["seeds"], theirs["seeds"], strict=True)]
        entry["vs_maml"] = {**seed_stats(diffs), "seeds": diffs}
    return out


def _pct(s: Dict[str, Any] | None) -> str:
    if s is None:
        return ""
    ci = "" if s["ci95"] is None else f" +- {100 * s['ci95']:.2f}"
    return f"{100 * s['mean']:.2f}{ci}"


def markdown(summary: Dict[str, Any], title: str) -> str:
    """Tables of :func:`summarise`'s output, accuracies in % (mean +- 95 % CI over seeds)."""
    lines = [
        f"**{title}**",
        "",
        "| arm | K train | K test | saved MB / task | headline mode (val) | headline test acc. |"
        " per-seed test acc. | minus MAML, paired by seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in summary.items():
        head = s["headline_test"]
        seeds = "" if head is None else ", ".join(f"{100 * v:.2f}" for v in head["seeds"])
        lines.append(
            f"| {arm} | {s['inner_steps']} | {s['test_steps']} | "
            f"{s['saved_bytes_per_task'] / 1e6:.1f} | {s['headline_mode'] or ''} | "
            f"{_pct(head)} | {seeds} | {_pct(s.get('vs_maml'))} |"
        )
    lines += [
        "",
        "| arm | split | " + " | ".join(EVAL_MODES) + " |",
        "|---|---|" + "---|" * len(EVAL_MODES),
    ]
    for arm, s in summary.items():
        for split, modes in s["eval"].items():
            cells = " | ".join(_pct(modes.get(m)) for m in EVAL_MODES)
            lines.append(f"| {arm} | {split} | {cells} |")
    covered = {a: s for a, s in summary.items() if s["training_coverage"]}
    if covered:
        lines += [
            "",
            "| arm | (step, task) pairs missing a class: training | test, pruned mode |"
            " smallest class's share: training | test, pruned mode |",
            "|---|---|---|---|---|",
        ]
        for arm, s in summary.items():
            tr, te = s["training_coverage"], s["test_pruned_coverage"]
            if tr is None and te is None:
                continue

            def f(c: Dict[str, float] | None, k: str) -> str:
                return "" if c is None else f"{100 * c[k]:.1f} %"

            lines.append(
                f"| {arm} | {f(tr, 'missing')} | {f(te, 'missing')} | {f(tr, 'min_share')} | "
                f"{f(te, 'min_share')} |"
            )
    return "\n".join(lines) + "\n"


def _title(cfg: Dict[str, Any], seeds: Sequence[int]) -> str:
    return (
        f"{cfg['data']}, {cfg['ways']}-way {cfg['shots']}-shot, "
        f"{cfg['image_size']}x{cfg['image_size']}, Conv4-{cfg['hidden']}, "
        f"{cfg['outer_steps']} outer steps, seeds {list(seeds)}"
    )


def compare(
    base: RunConfig,
    out: Path,
    seeds: Sequence[int],
    arms: Sequence[str] = tuple(ARMS),
    memory: bool = False,
    slack: float = 0.01,
) -> Dict[str, Any]:
    """Run every arm and seed under ``out`` and write the summary files; with ``memory``,
    first fit GradNCP's bootstrap chunk into MAML's measured budget plus ``slack``
    (:func:`fit_memory`)."""
    out.mkdir(parents=True, exist_ok=True)
    budget = None
    if memory:
        budget = fit_memory(base, slack)
        base = dataclasses.replace(base, bootstrap_chunk=budget["bootstrap_chunk"])
    results: Dict[str, List[Dict[str, Any]]] = {a: [] for a in arms}
    for seed in seeds:
        for arm in arms:
            cfg = arm_config(base, arm, seed, out)
            done = Path(cfg.out) / "result.json"
            if done.is_file() and not cfg.restart:
                prior = read_result(done)
                if prior["settings"] == cfg.to_dict():
                    results[arm].append(prior)
                    continue
            results[arm].append(run_one(cfg))
    summary = {"summary": summarise(results), "memory": budget, "settings": base.to_dict()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary["summary"], _title(base.to_dict(), seeds)))
    return summary


def read_result(path: Path) -> Dict[str, Any]:
    """A run's ``result.json``, its settings upgraded to today's names (ncp 0.2.0 wrote them
    under ``config`` with other spellings; see :func:`examples.harness.upgrade`)."""
    result = json.loads(path.read_text())
    result["settings"] = harness.upgrade(result.pop("config", None) or result["settings"])
    return result


def summarise_dir(out: Path) -> Dict[str, Any]:
    """Summarise the finished runs under ``out`` (``ARM-sSEED/result.json``) without running
    anything; writes ``summary.json`` and ``summary.md`` there."""
    results: Dict[str, List[Dict[str, Any]]] = {}
    for arm in ARMS:
        runs = [read_result(p) for p in out.glob(f"{arm}-s*/result.json")]
        if runs:
            results[arm] = sorted(runs, key=lambda r: r["settings"]["seed"])
    if not results:
        raise FileNotFoundError(f"no finished run (ARM-sSEED/result.json) under {out}.")
    first = next(iter(results.values()))[0]["settings"]
    seeds = sorted({r["settings"]["seed"] for runs in results.values() for r in runs})
    summary = {"summary": summarise(results), "memory": None, "settings": first}
    prior = out / "summary.json"
    if prior.is_file():
        summary["memory"] = json.loads(prior.read_text()).get("memory")
    prior.write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary["summary"], _title(first, seeds)))
    return summary


def parse(argv: Sequence[str] | None) -> Tuple[argparse.Namespace, RunConfig]:
    """Parse compare's flags and the run flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.set_defaults(out="runs/many_shot/compare")  # the comparison's folder
    parser.add_argument(
        "--fit-memory",
        action="store_true",
        help="measure saved bytes and chunk GradNCP's bootstrap until it fits MAML's budget",
    )
    parser.add_argument(
        "--memory-slack",
        type=float,
        default=0.01,
        help="with --fit-memory: tolerated excess over MAML's saved bytes (fraction)",
    )
    parser.add_argument(
        "--summarise-only",
        action="store_true",
        help="only summarise the finished runs under --out",
    )
    args = parser.parse_args(argv)
    return args, config_from_args(args)


def main(argv: Sequence[str] | None = None) -> Dict[str, Any]:
    """CLI entry point; prints the summary tables."""
    args, base = parse(argv)
    out = Path(args.out)
    if args.summarise_only:
        summary = summarise_dir(out)
    else:
        summary = compare(base, out, args.seeds, args.arms, args.fit_memory, args.memory_slack)
    print((out / "summary.md").read_text(), file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
