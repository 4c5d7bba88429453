"""The whole Table 12 comparison on the offline stand-ins, in parallel worker processes.

Run from the repository root (the command behind ``docs/reproduction/many_shot.md``)::

    python -m examples.many_shot.reproduce --out runs/many_shot/repro --device cuda \\
        --workers 9 --train-seconds 200

For each setting (glyphs 5-way 100-shot, glyphs 10-way 50-shot, Fashion-MNIST 5-way 100-shot):

1. measure one MAML outer step's saved bytes and fit GradNCP's horizon into them
   (:func:`examples.many_shot.budget.match_steps`);
2. time a few outer steps of each method and pick one number of outer steps, shared by both
   methods and all seeds, that fits ``--train-seconds`` (or take ``--outer-steps``);
3. train and evaluate both methods for every seed, one ``(setting, seed)`` pair per worker;
4. write ``OUT/SETTING/summary.{json,md}`` and ``OUT/plan.json``.

Flags after ``--`` go to every run (e.g. ``-- --hidden 32 --eval-episodes 300``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

import ncp

from .compare import compare, matched_steps
from .episodes import EpisodeSampler
from .model import build_model
from .train import RunConfig, add_arguments, config_from_args, load_splits, meta_config

SETTINGS: Dict[str, Dict[str, Any]] = {
    "glyphs-5w100s": {"data": "glyphs", "ways": 5, "shots": 100},
    "glyphs-10w50s": {"data": "glyphs", "ways": 10, "shots": 50},
    "fashion-5w100s": {"data": "fashion", "ways": 5, "shots": 100},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(cfg: RunConfig, method: str, repeats: int = 3) -> float:
    """Seconds of one outer step of ``method`` (after one warm-up step)."""
    device = torch.device(cfg.device)
    splits = load_splits(cfg)
    model = build_model(cfg.ways, cfg.channels, cfg.hidden, cfg.image_size, cfg.norm, cfg.seed).to(
        device
    )
    sampler = EpisodeSampler(splits["train"], cfg.ways, cfg.shots, cfg.queries, seed=cfg.seed)
    meta = meta_config(cfg, method)
    times = []
    for i in range(repeats + 1):
        batch = sampler.sample(cfg.tasks).to(device).batch()
        _sync(device)
        t0 = time.perf_counter()
        out = ncp.meta_step(model, batch, meta, loss_fn=ncp.losses.cross_entropy)
        out.loss.backward()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return min(times)


def plan(
    base: RunConfig,
    settings: Sequence[str],
    train_seconds: float | None,
    slowdown: float,
    max_outer_steps: int,
) -> Dict[str, Dict[str, Any]]:
    """Per setting: GradNCP's matched horizon, measured bytes, step times and outer steps."""
    out: Dict[str, Dict[str, Any]] = {}
    for name in settings:
        cfg = dataclasses.replace(base, **SETTINGS[name])
        entry: Dict[str, Any] = dict(matched_steps(cfg))
        cfg = dataclasses.replace(cfg, inner_steps=entry["inner_steps"])
        if train_seconds is None:
            entry["outer_steps"] = base.outer_steps
        else:
            t = {m: time_step(cfg, m) for m in ("maml", "gradncp")}
            entry["step_seconds"] = t
            steps = math.floor(train_seconds / (slowdown * (t["maml"] + t["gradncp"])))
            entry["outer_steps"] = max(10, min(max_outer_steps, steps))
        out[name] = entry
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/many_shot/repro")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument(
        "--outer-steps",
        type=int,
        default=300,
        help="outer steps of every run (without --train-seconds)",
    )
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="pick outer steps so one worker's training (both methods) takes about this long",
    )
    parser.add_argument(
        "--slowdown", type=float, default=2.0, help="assumed slowdown of parallel workers"
    )
    parser.add_argument("--max-outer-steps", type=int, default=2000)
    parser.add_argument("--glyph-bank", default=None, help="a rendered glyph bank .npz")
    parser.add_argument("--fashion-root", default=None, help="folder of Fashion-MNIST's .gz files")
    args = parser.parse_args(own)

    run_parser = argparse.ArgumentParser()
    add_arguments(run_parser)
    common = [
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--outer-steps",
        str(args.outer_steps),
        "--no-progress",
        *extra,
    ]
    base = config_from_args(run_parser.parse_args(common))
    torch.set_num_threads(args.threads)
    roots = {"glyphs": args.glyph_bank, "fashion": args.fashion_root}

    def cfg_for(name: str) -> RunConfig:
        setting = SETTINGS[name]
        return dataclasses.replace(base, **setting, data_root=roots[setting["data"]])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plans = {}
    for name in args.settings:
        p = plan(cfg_for(name), [name], args.train_seconds, args.slowdown, args.max_outer_steps)
        plans[name] = p[name]
        print(f"plan {name}: {plans[name]}", file=sys.stderr, flush=True)
    (out / "plan.json").write_text(json.dumps(plans, indent=2) + "\n")

    def job(name: str, seed: int) -> int:
        p = plans[name]
        flags = [
            sys.executable,
            "-m",
            "examples.many_shot.compare",
            *common,
            *[f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS[name].items()],
            f"--inner-steps={p['inner_steps']}",
            f"--outer-steps={p['outer_steps']}",
            f"--seeds={seed}",
            f"--out={out / name}",
        ]
        root = roots[SETTINGS[name]["data"]]
        if root is not None:
            flags.append(f"--data-root={root}")
        with open(out / f"log-{name}-s{seed}.txt", "w") as log:
            return subprocess.run(flags, stdout=log, stderr=subprocess.STDOUT).returncode

    jobs = [(n, s) for s in args.seeds for n in args.settings]
    with ThreadPoolExecutor(args.workers) as pool:
        codes = list(pool.map(lambda a: job(*a), jobs))
    failed = [j for j, c in zip(jobs, codes, strict=True) if c != 0]
    if failed:
        raise RuntimeError(f"runs failed: {failed}; see {out}/log-*.txt")
    tables: List[str] = []
    for name in args.settings:
        cfg = dataclasses.replace(
            cfg_for(name),
            inner_steps=plans[name]["inner_steps"],
            outer_steps=plans[name]["outer_steps"],
        )
        compare(cfg, out / name, args.seeds)
        tables.append((out / name / "summary.md").read_text())
    (out / "summary.md").write_text("\n".join(tables))
    print("\n".join(tables), file=sys.stderr)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
