"""Table 4 on the procedural scenes: MAML, the random-ray baseline and GradNCP, several seeds.

Run from the repository root (about 35 minutes a seed on one shared CPU core)::

    python -m examples.nerf.reproduce --out runs/nerf --seeds 0 1 2

Each run is ``python -m examples.nerf.train`` in its own process (one thread), in
``OUT/<method>_s<seed>``; a finished run (``result.json`` present) is skipped and an
interrupted one resumes from its checkpoint. ``--set KEY=VALUE`` passes a train flag to every
run. The summary (``OUT/summary.md``, also printed) gives, per method, the unseen-view PSNR of
the mode chosen on the validation scenes, mean +- 95 % confidence interval over seeds (Student's
t), each seed's value, the difference to MAML paired by seed, every mode on both splits, and
the saved-tensor memory of one meta-step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Sequence

from .. import harness
from ..neural_fields.reproduce import cell
from .train import DEFAULTS, METHODS, MODES, RESULT

PAPER = {"maml": 22.80, "gradncp": 24.06}
"""The paper's Table 4 (ShapeNet Cars, unseen-view PSNR in dB); its Learnit row is MAML."""


def run_folder(out: str, method: str, seed: int) -> str:
    return os.path.join(out, f"{method}_s{seed}")


def command(method: str, seed: int, out: str, overrides: Sequence[str]) -> List[str]:
    """The train command line of one run."""
    cmd = [sys.executable, "-m", "examples.nerf.train", "--method", method, "--seed", str(seed)]
    cmd += ["--out", run_folder(out, method, seed)]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key.replace("-", "_") not in DEFAULTS:
            raise ValueError(
                f"`--set` takes KEY=VALUE with KEY a train setting (e.g. outer_steps=100), got "
                f"{item!r}."
            )
        cmd += ["--" + key.replace("_", "-"), value]
    return cmd


def read(out: str, method: str, seed: int) -> Dict[str, Any] | None:
    path = os.path.join(run_folder(out, method, seed), RESULT)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def summary(out: str, seeds: Sequence[int], methods: Sequence[str] = METHODS) -> str:
    """The Markdown summary of the finished runs in ``out``."""
    results = {m: {s: read(out, m, s) for s in seeds} for m in methods}
    lines = [
        "| method | saved MB / step | headline mode (val) | unseen-view PSNR, dB | per seed "
        "| minus MAML, paired | paper (ShapeNet Cars) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def headline(r: Dict[str, Any]) -> float:
        return r["test"][r["headline"]]["psnr"]

    for m in methods:
        done = {s: r for s, r in results[m].items() if r is not None}
        values = [headline(r) for r in done.values()]
        modes = sorted({r["headline"] for r in done.values()})
        paired = [
            headline(r) - headline(results["maml"][s])
            for s, r in done.items()
            if m != "maml" and results.get("maml", {}).get(s) is not None
        ]
        mb = [v for v in (harness.saved_mb(run_folder(out, m, s)) for s in done) if v is not None]
        lines.append(
            f"| {m} | {max(mb):.0f} | {', '.join(modes) or '-'} | {cell(values)} | "
            f"{', '.join(f'{v:.2f}' for v in values)} | {cell(paired) if paired else ''} | "
            f"{PAPER.get(m, '-')} |"
            if mb
            else f"| {m} | - | - | not run | | | {PAPER.get(m, '-')} |"
        )
    lines += [
        "",
        "| method | split | " + " | ".join(MODES) + " |",
        "| --- | --- | " + " | ".join("---" for _ in MODES) + " |",
    ]
    for m in methods:
        done = [r for r in results[m].values() if r is not None]
        for split in ("val", "test"):
            cells = [cell([r[split][mode]["psnr"] for r in done]) for mode in MODES]
            lines.append(f"| {m} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "nerf"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--report", action="store_true", help="only write the summary")
    args = p.parse_args(argv)
    if not args.report:
        for seed in args.seeds:
            for method in args.methods:
                if read(args.out, method, seed) is not None:
                    continue
                folder = run_folder(args.out, method, seed)
                if harness.run_logged(command(method, seed, args.out, args.overrides), folder):
                    raise SystemExit(f"{folder}: FAILED, see {folder}/stdout.log")
    text = summary(args.out, args.seeds, args.methods)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
