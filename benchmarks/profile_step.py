"""Where one GradNCP outer step spends its time: phases, operators, ``vmap`` against a loop.

The step of ``bench_meta_step.py`` (SIREN 5x256, 64x64 RGB, 4 tasks, K=16, ratio 0.25, L=5, one
thread by default), after one warm-up step, measured three ways:

1. **phases** (``cProfile``, one step): the cumulative time of the functions that make up
   ``ncp.meta_step`` plus ``loss.backward()``, split by caller where a function serves two
   phases (``task_gradients`` runs both the inner steps and the bootstrap's target steps):
   scoring (``Selector.__call__``, K calls; also split into the forward pass, the
   ``dl/dz`` autograd call and the closed form), inner steps, bootstrap target and distance,
   query loss, the rest of ``meta_step`` (validation, set-up), and ``backward``. cProfile adds
   overhead to every Python call; the profiled and unprofiled step times are both printed;
2. **operators** (``torch.profiler``, one step): the operators with the most self CPU time;
3. **vmap against a loop over tasks**: the same step with ``MetaConfig(vmap_tasks=False)``,
   medians of ``--repeats`` round-robin steps.

Run ``python benchmarks/profile_step.py --help`` for the flags (about 1.5 minutes by default on
one thread of a 2-core x86 CPU).
"""

from __future__ import annotations

import cProfile
import dataclasses
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import torch

import ncp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Siren, environment, header, image_batch, outer_step, timed, warm_up

Site = Tuple[str, str]  # (file suffix, function name)
META_STEP: Site = ("ncp/_driver.py", "meta_step")


def _matches(key: Tuple[str, int, str], site: Site) -> bool:
    return key[2] == site[1] and key[0].replace("\\", "/").endswith(site[0])


def cumulative(stats: Mapping[Any, Any], site: Site, caller: Site | None = None) -> float:
    """Cumulative seconds of ``site``, only through calls from ``caller`` when given."""
    total = 0.0
    for key, (_cc, _nc, _tt, ct, callers) in stats.items():
        if not _matches(key, site):
            continue
        if caller is None:
            total += ct
            continue
        for ckey, edge in callers.items():
            if _matches(ckey, caller):
                total += edge[3]
    return total


def phases(model: torch.nn.Module, batch: Any, cfg: ncp.MetaConfig) -> Dict[str, Any]:
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    outer_step(model, batch, cfg)
    prof.disable()
    wall = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    st = pstats.Stats(prof).stats  # type: ignore[attr-defined]

    step = cumulative(st, META_STEP)
    parts = {
        "scoring (K calls of Selector.__call__)": cumulative(
            st, ("ncp/_pruning.py", "__call__"), META_STEP
        ),
        "inner steps (task_gradients + sgd_update)": cumulative(
            st, ("ncp/_inner.py", "task_gradients"), META_STEP
        )
        + cumulative(st, ("ncp/_inner.py", "sgd_update"), META_STEP),
        "bootstrap target + distance": cumulative(st, ("ncp/_bootstrap.py", "__call__")),
        "query loss": cumulative(st, ("ncp/_inner.py", "task_losses"), META_STEP),
    }
    parts["rest of meta_step (checks, set-up)"] = step - sum(parts.values())
    parts["backward"] = cumulative(st, ("torch/_tensor.py", "backward"))
    total = step + parts["backward"]
    head_io = ("ncp/_scoring.py", "_head_io")
    scoring = {
        "forward pass (single_forward)": cumulative(
            st, ("ncp/_params.py", "single_forward"), head_io
        ),
        "dl/dz (torch.autograd.grad)": cumulative(
            st, ("torch/autograd/__init__.py", "grad"), head_io
        ),
        "closed form (linear_head_score)": cumulative(
            st, ("ncp/_scoring.py", "linear_head_score"), ("ncp/_scoring.py", "__call__")
        ),
        "top-k and gather": cumulative(st, ("ncp/_pruning.py", "top_k_indices"))
        + cumulative(st, ("ncp/_pruning.py", "gather_points")),
    }
    return {"wall_s": wall, "total_s": total, "phases": parts, "scoring": scoring}


def operators(model: torch.nn.Module, batch: Any, cfg: ncp.MetaConfig, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        outer_step(model, batch, cfg)
    model.zero_grad(set_to_none=True)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run(
    *,
    resolution: int,
    tasks: int,
    repeats: int,
    threads: int,
    seed: int,
    rows: int,
    chunk_size: int | None = None,
) -> Dict[str, Any]:
    torch.set_num_threads(threads)
    env = environment("cpu")
    torch.manual_seed(seed)
    model = Siren()
    batch = image_batch(resolution, tasks, seed=seed)
    cfg = ncp.MetaConfig(chunk_size=chunk_size)  # K=16, ratio 0.25, L=5
    loop = dataclasses.replace(cfg, vmap_tasks=False)
    dev = torch.device("cpu")
    warm_up(model, batch)
    outer_step(model, batch, cfg)
    model.zero_grad(set_to_none=True)

    times: Dict[str, list] = {"vmap": [], "loop": []}
    for _ in range(repeats):
        for name, c in (("vmap", cfg), ("loop", loop)):
            times[name].append(timed(lambda c=c: outer_step(model, batch, c), dev))
            model.zero_grad(set_to_none=True)
    prof = phases(model, batch, cfg)
    table = operators(model, batch, cfg, rows)
    return {
        "setup": {
            "model": "SIREN 5x256, w0=30, 2->3",
            "resolution": resolution,
            "tasks": tasks,
            "config": f"K=16, ratio 0.25, L=5, chunk_size={chunk_size}",
            "repeats": repeats,
            "seed": seed,
            **env,
        },
        "vmap_s": times["vmap"],
        "loop_s": times["loop"],
        "profile": prof,
        "operators": table,
        "load_average_1min_end": environment("cpu")["load_average_1min"],
    }


def report(res: Mapping[str, Any]) -> str:
    s = res["setup"]
    p = res["profile"]
    vmap_s, loop_s = statistics.median(res["vmap_s"]), statistics.median(res["loop_s"])
    lines = [
        header(
            f"ncp step profile: {s['model']}, {s['resolution']}x{s['resolution']} RGB, "
            f"{s['tasks']} tasks, GradNCP {s['config']}, float32",
            s,
            res["load_average_1min_end"],
        ),
        "",
        f"step time (meta_step + backward), median of {s['repeats']} round-robin steps:",
        f"  vmap over tasks (default)  {vmap_s:.3f} s",
        f"  loop over tasks            {loop_s:.3f} s   (loop / vmap = {loop_s / vmap_s:.3f})",
        "",
        f"phases of one step under cProfile (profiled step {p['wall_s']:.3f} s; "
        f"unprofiled median {vmap_s:.3f} s):",
    ]
    total = p["total_s"]
    for name, sec in p["phases"].items():
        lines.append(f"  {name:<46}{sec:>8.3f} s{sec / total:>8.1%}")
    lines.append(f"  {'total':<46}{total:>8.3f} s")
    lines += ["", "inside scoring:"]
    scoring = p["phases"]["scoring (K calls of Selector.__call__)"]
    for name, sec in p["scoring"].items():
        lines.append(f"  {name:<46}{sec:>8.3f} s{sec / scoring:>8.1%} of scoring")
    lines += ["", "operators by self CPU time (torch.profiler, one step):", res["operators"]]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=64, help="image side (default 64)")
    parser.add_argument("--tasks", type=int, default=4, help="images per outer step (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per mode (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and images")
    parser.add_argument("--rows", type=int, default=15, help="operators listed (default 15)")
    parser.add_argument("--chunk-size", type=int, default=None, help="MetaConfig.chunk_size")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.resolution < 16 or args.tasks < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--resolution >= 16, --tasks >= 1, --repeats >= 1, --threads >= 1")
    results = run(
        resolution=args.resolution,
        tasks=args.tasks,
        repeats=args.repeats,
        threads=args.threads,
        seed=args.seed,
        rows=args.rows,
        chunk_size=args.chunk_size,
    )
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
