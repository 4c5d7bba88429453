"""MAML against GradNCP at equal memory, over several seeds: the paper's Table 12 protocol.

Run from the repository root::

    python -m examples.many_shot.compare --data glyphs --ways 5 --shots 100 --seeds 0 1 2 \\
        --out runs/many_shot/glyphs-5w100s

Takes every flag of :mod:`examples.many_shot.train` (``--run-dir`` excepted) and runs each
method and seed in ``OUT/METHOD-sSEED`` (a rerun resumes unfinished runs and reuses finished
ones), then writes ``OUT/summary.json`` and ``OUT/summary.md``: per method, the test accuracy
of each seed (mean and 95 % confidence interval over its test episodes), the mean and standard
deviation over seeds (as the paper reports), and the bytes one outer step saves for backward.
With ``--match-memory`` GradNCP's horizon is the longest whose measured saved bytes fit MAML's
(instead of the paper's ``maml_steps / ratio`` rule).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from .budget import match_steps
from .episodes import EpisodeSampler
from .model import build_model
from .train import METHODS, RunConfig, add_arguments, config_from_args, load_splits, meta_config
from .train import run as run_one


def matched_steps(cfg: RunConfig) -> Dict[str, int]:
    """GradNCP's horizon fitted into MAML's measured budget on one training episode."""
    splits = load_splits(cfg)
    model = build_model(cfg.ways, cfg.channels, cfg.hidden, cfg.image_size, cfg.norm, cfg.seed).to(
        torch.device(cfg.device)
    )
    sampler = EpisodeSampler(splits["train"], cfg.ways, cfg.shots, cfg.queries, seed=cfg.seed)
    batch = sampler.sample(1).to(torch.device(cfg.device)).batch()
    steps, used, budget = match_steps(
        model, batch, meta_config(cfg, "maml"), meta_config(cfg, "gradncp")
    )
    return {"inner_steps": steps, "gradncp_bytes": used, "maml_bytes": budget}


def summarise(results: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    """Per method: each seed's test mean and CI, and mean and std over seeds."""
    out: Dict[str, Any] = {}
    for method, runs in results.items():
        means = [r["test"]["mean"] for r in runs]
        entry: Dict[str, Any] = {
            "inner_steps": runs[0]["inner_steps"],
            "test_steps": runs[0]["test_steps"],
            "saved_bytes_per_task": runs[0]["saved_bytes_per_task"],
            "seeds": [
                {"seed": r["config"]["seed"], "mean": r["test"]["mean"], "ci95": r["test"]["ci95"]}
                for r in runs
            ],
            "mean_over_seeds": float(np.mean(means)),
            "std_over_seeds": float(np.std(means, ddof=1)) if len(means) > 1 else None,
            "episodes_per_seed": runs[0]["test"]["episodes"],
            "train_seconds": [r["train_seconds"] for r in runs],
        }
        if all("test_no_rescale" in r for r in runs):
            plain = [r["test_no_rescale"]["mean"] for r in runs]
            entry["no_rescale_mean_over_seeds"] = float(np.mean(plain))
            entry["no_rescale_std_over_seeds"] = (
                float(np.std(plain, ddof=1)) if len(plain) > 1 else None
            )
        out[method] = entry
    return out


def markdown(summary: Dict[str, Any], title: str) -> str:
    """A small table of :func:`summarise`'s output, accuracies in %."""
    lines = [
        f"**{title}**",
        "",
        "| method | K train | K test | saved MB / task | test acc. (mean +- std over seeds) | per seed (mean +- 95 % CI) |",
        "|---|---|---|---|---|---|",
    ]
    for method, s in summary.items():
        std = "" if s["std_over_seeds"] is None else f" +- {100 * s['std_over_seeds']:.2f}"
        seeds = ", ".join(f"{100 * x['mean']:.2f} +- {100 * x['ci95']:.2f}" for x in s["seeds"])
        lines.append(
            f"| {method} | {s['inner_steps']} | {s['test_steps']} | "
            f"{s['saved_bytes_per_task'] / 1e6:.1f} | {100 * s['mean_over_seeds']:.2f}{std} | {seeds} |"
        )
        if "no_rescale_mean_over_seeds" in s:
            nstd = s["no_rescale_std_over_seeds"]
            nstd_s = "" if nstd is None else f" +- {100 * nstd:.2f}"
            lines.append(
                f"| {method}, no test-time rescaling | | | | "
                f"{100 * s['no_rescale_mean_over_seeds']:.2f}{nstd_s} | |"
            )
    return "\n".join(lines) + "\n"


def compare(
    base: RunConfig,
    out: Path,
    seeds: Sequence[int],
    methods: Sequence[str] = METHODS,
    match_memory: bool = False,
) -> Dict[str, Any]:
    """Run every method and seed under ``out`` and write the summary files."""
    out.mkdir(parents=True, exist_ok=True)
    budget = None
    if match_memory:
        budget = matched_steps(base)
        base = dataclasses.replace(base, inner_steps=budget["inner_steps"])
    results: Dict[str, List[Dict[str, Any]]] = {m: [] for m in methods}
    for seed in seeds:
        for method in methods:
            cfg = dataclasses.replace(
                base, method=method, seed=seed, run_dir=str(out / f"{method}-s{seed}")
            )
            done = Path(cfg.run_dir) / "result.json"
            if done.is_file() and not cfg.restart:
                prior = json.loads(done.read_text())
                if prior["config"] == cfg.to_dict():
                    results[method].append(prior)
                    continue
            results[method].append(run_one(cfg))
    summary = {"summary": summarise(results), "matched_memory": budget, "config": base.to_dict()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = (
        f"{base.data}, {base.ways}-way {base.shots}-shot, {base.image_size}x{base.image_size}, "
        f"Conv4-{base.hidden}, {base.outer_steps} outer steps, seeds {list(seeds)}"
    )
    (out / "summary.md").write_text(markdown(summary["summary"], title))
    return summary


def summarise_dir(out: Path) -> Dict[str, Any]:
    """Summarise the finished runs under ``out`` (``METHOD-sSEED/result.json``) without running
    anything; writes ``summary.json`` and ``summary.md`` there."""
    results: Dict[str, List[Dict[str, Any]]] = {}
    for method in METHODS:
        paths = sorted(out.glob(f"{method}-s*/result.json"))
        runs = [json.loads(p.read_text()) for p in paths]
        if runs:
            results[method] = sorted(runs, key=lambda r: r["config"]["seed"])
    if not results:
        raise FileNotFoundError(f"no finished run (METHOD-sSEED/result.json) under {out}.")
    first = next(iter(results.values()))[0]["config"]
    seeds = sorted({r["config"]["seed"] for runs in results.values() for r in runs})
    summary = {"summary": summarise(results), "matched_memory": None, "config": first}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = (
        f"{first['data']}, {first['ways']}-way {first['shots']}-shot, "
        f"{first['image_size']}x{first['image_size']}, Conv4-{first['hidden']}, "
        f"{first['outer_steps']} outer steps, seeds {seeds}"
    )
    (out / "summary.md").write_text(markdown(summary["summary"], title))
    return summary


def main(argv: Sequence[str] | None = None) -> Dict[str, Any]:
    """CLI entry point; prints the summary table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", default="runs/many_shot/compare")
    parser.add_argument(
        "--match-memory",
        action="store_true",
        help="fit GradNCP's horizon into MAML's measured saved bytes",
    )
    parser.add_argument(
        "--summarise-only",
        action="store_true",
        help="only summarise the finished runs under --out",
    )
    args = parser.parse_args(argv)
    if args.summarise_only:
        summary = summarise_dir(Path(args.out))
        print((Path(args.out) / "summary.md").read_text(), file=sys.stderr)
        return summary
    base = config_from_args(args)
    summary = compare(base, Path(args.out), args.seeds, args.methods, args.match_memory)
    print((Path(args.out) / "summary.md").read_text(), file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
