"""One GradNCP outer step on one RGB image from 64x64 to 1024x1024 (1,048,576 points).

SIREN 5x256 (w0=30), float32, ``MetaConfig(chunk_size=...)`` so that every full-context pass
(scoring, the bootstrap target's first-order steps, the checkpointed query loss) holds at most
one chunk's activations. What stays in memory for backward is then the inner graph, about
``kept points x K x 20 KB`` for SIREN 5x256 (20.3 KB per point-step measured by
``bench_sweep.py``), plus chunk-sized transients. The default chunk, 16,384 points, keeps each
activation tensor (16,384 x 256 x 4 bytes = 16 MiB) under glibc's 32 MiB ``mmap`` threshold:
larger tensors are mapped and unmapped at every allocation, and on CPU the page faults can
double a step (see docs/benchmarks.md). Configurations:

* ``K=16 r=0.01 L=5`` at every size: the paper's horizon and bootstrap with a ratio small
  enough for 1024x1024 (10,485 kept points: ~3.4 GB of inner graph), so that growth from
  64x64 to 1024x1024 is read on one configuration;
* ``K=16 r=0.25 L=5``, the paper's setting, where its inner graph is predicted to fit under
  ``--mem-limit-gb`` (64x64 and 256x256 on a 24 GiB machine; 512x512 would need ~21 GB).

Each run is a fresh process (``_common.run_isolated``): build the image, one warm-up step on
its first 4,096 points, return freed heap to the OS and reset the RSS high-water mark, then one
outer step (``meta_step`` + ``backward``) under ``ncp.MemoryMeter``, timed: the first
full-size step of the process, so it includes the first touch of its memory. Sizes up to
``--repeat-up-to`` points also time ``--repeats`` more steps (the median is reported with the
metered one). One call of ``ContextPruner.scores`` on the full context is timed after the
step; ``K`` times it estimates the step's scoring share.

Runs with ``torch.set_num_threads(--threads)``, 2 by default (both cores of the CPU machine
this was written on). Run ``python benchmarks/bench_scale.py --help`` for the flags; the
defaults take about 6 minutes there, half of it the single 1024x1024 step.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping

import torch

import ncp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    GB,
    MB,
    Siren,
    environment,
    fmt_bytes,
    header,
    image_batch,
    memory_limit_bytes,
    metered_step,
    outer_step,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_isolated,
    timed,
    trim_heap,
)

BYTES_PER_POINT_STEP = 20.3e3  # SIREN 5x256, float32, second order (bench_sweep.py)
MAIN, PAPER = "K=16 r=0.01 L=5", "K=16 r=0.25 L=5"
RECOMPUTE = "K=16 r=0.01 L=5 recompute"
CONFIGS: Dict[str, Dict[str, Any]] = {
    MAIN: {"k": 16, "ratio": 0.01, "bootstrap_steps": 5},
    PAPER: {"k": 16, "ratio": 0.25, "bootstrap_steps": 5},
    # MetaConfig(recompute_steps=True): one step's graph instead of K (exact; more time)
    RECOMPUTE: {"k": 16, "ratio": 0.01, "bootstrap_steps": 5, "recompute": True},
}


def config(c: Mapping[str, Any], chunk_size: int) -> ncp.MetaConfig:
    return ncp.MetaConfig(
        inner_steps=c["k"],
        pruner=ncp.ContextPruner(ratio=c["ratio"]),
        bootstrap=ncp.BootstrapMetaLoss(steps=c["bootstrap_steps"]),
        chunk_size=chunk_size,
        recompute_steps=c.get("recompute", False),
    )


def inner_graph_bytes(c: Mapping[str, Any], points: int) -> float:
    """The predicted inner graph: kept points x steps held x bytes per point-step (one step
    at a time when the steps are recomputed in backward)."""
    held = 1 if c.get("recompute") else c["k"]
    return ncp.functional.keep_count(c["ratio"], points) * held * BYTES_PER_POINT_STEP


def measure(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """One configuration at one size, in its own process (see the module docstring)."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    dev = torch.device(spec["device"])
    model = Siren().to(dev)
    x, y = (t.to(dev) for t in image_batch(spec["resolution"], 1, seed=spec["seed"]))
    cfg = config(spec["config"], spec["chunk_size"])
    n = min(x.shape[1], 4096)
    outer_step(model, (x[:, :n], y[:, :n]), cfg)  # warm-up
    model.zero_grad(set_to_none=True)

    trim_heap()
    base = rss_bytes()
    reset = reset_peak_rss()
    start = time.perf_counter()
    metered = metered_step("", model, (x, y), cfg, dev)
    times = [time.perf_counter() - start]
    for _ in range(spec["repeats"]):
        times.append(timed(lambda: outer_step(model, (x, y), cfg), dev))
        model.zero_grad(set_to_none=True)
    peak = peak_rss_bytes()
    assert cfg.pruner is not None
    pruner = ncp.ContextPruner(ratio=cfg.pruner.ratio, chunk_size=spec["chunk_size"])
    score_s = timed(lambda: pruner.scores(model, x, y), dev)
    return {
        "times_s": times,
        "time_s": statistics.median(times),
        "peak_saved_bytes": metered.peak_saved_bytes,
        "peak_cuda_bytes": metered.peak_cuda_bytes,
        "peak_rss_bytes": peak,
        "setup_rss_bytes": base,
        "rss_above_bytes": peak - base if reset and base is not None else None,
        "scores_call_s": score_s,
        "threads": torch.get_num_threads(),
    }


def run(
    *,
    resolutions: List[int],
    chunk_size: int,
    threads: int,
    repeats: int,
    repeat_up_to: int,
    seed: int,
    mem_limit_bytes: float,
    device: str = "cpu",
    configs: List[str] | None = None,
) -> Dict[str, Any]:
    torch.set_num_threads(threads)
    env = environment(device)
    start = time.perf_counter()
    chosen = {name: CONFIGS[name] for name in (configs or list(CONFIGS))}
    out: Dict[str, Any] = {name: {} for name in chosen}
    for name, c in chosen.items():
        for res in resolutions:
            points = res * res
            graph = inner_graph_bytes(c, points)
            entry: Dict[str, Any] = {
                "resolution": res,
                "points": points,
                "kept": ncp.functional.keep_count(c["ratio"], points),
                "predicted_inner_graph_bytes": graph,
            }
            if graph > mem_limit_bytes:
                entry["skipped"] = True
                out[name][str(res)] = entry
                print(
                    f"  {name} {res}x{res}: not run, inner graph ~{graph / GB:.1f} GB > "
                    f"{mem_limit_bytes / GB:.1f} GB",
                    flush=True,
                )
                continue
            spec = {
                "config": c,
                "resolution": res,
                "chunk_size": chunk_size,
                "threads": threads,
                "repeats": repeats if points <= repeat_up_to else 0,
                "seed": seed,
                "device": device,
            }
            entry.update(run_isolated("bench_scale", "measure", spec))
            entry["skipped"] = False
            out[name][str(res)] = entry
            print(
                f"  {name} {res}x{res}: {entry['time_s']:.2f} s, saved "
                f"{entry['peak_saved_bytes'] / MB:.0f} MB, peak RSS "
                f"{entry['peak_rss_bytes'] / MB:.0f} MB",
                flush=True,
            )
    return {
        "setup": {
            "model": "SIREN 5x256, w0=30, 2->3",
            "tasks": 1,
            "dtype": "float32",
            "chunk_size": chunk_size,
            "seed": seed,
            "mem_limit_bytes": mem_limit_bytes,
            **env,
        },
        "configs": chosen,
        "results": out,
        "wall_s": time.perf_counter() - start,
        "load_average_1min_end": environment(device)["load_average_1min"],
    }


def report(res: Mapping[str, Any]) -> str:
    s = res["setup"]
    lines = [
        header(
            f"ncp scale benchmark: {s['model']}, one RGB image per step, {s['dtype']}, "
            f"chunk_size={s['chunk_size']}, one fresh process per run",
            s,
            res["load_average_1min_end"],
        ),
        "time: meta_step + backward (the metered step, with the median of any further steps); "
        "saved: ncp.MemoryMeter peak; RSS: VmHWM of the run's process and its peak above the "
        "RSS before the step; scoring: K x one full-context ContextPruner.scores call, over "
        "the step time (1 MB = 1e6 bytes)",
    ]
    for name, rows in res["results"].items():
        k = res["configs"][name]["k"]
        lines += [
            "",
            f"GradNCP {name}",
            f"{'size':>10}{'points':>9}{'kept':>8}{'steps':>6}{'time (s)':>10}"
            f"{'saved (MB)':>12}{'peak RSS (MB)':>15}{'RSS above (MB)':>16}{'scoring':>9}"
            f"{'CUDA peak (MB)':>16}",
        ]
        first = None
        for r in rows.values():
            size = f"{r['resolution']}x{r['resolution']}"
            if r["skipped"]:
                lines.append(
                    f"{size:>10}{r['points']:>9}{r['kept']:>8}   not run: inner graph "
                    f"~{r['predicted_inner_graph_bytes'] / GB:.1f} GB > limit"
                )
                continue
            first = first or r
            share = k * r["scores_call_s"] / r["time_s"]
            lines.append(
                f"{size:>10}{r['points']:>9}{r['kept']:>8}{len(r['times_s']):>6}"
                f"{r['time_s']:>10.2f}{fmt_bytes(r['peak_saved_bytes']):>12}"
                f"{fmt_bytes(r['peak_rss_bytes']):>15}{fmt_bytes(r['rss_above_bytes']):>16}"
                f"{share:>9.1%}{fmt_bytes(r.get('peak_cuda_bytes')):>16}"
            )
        ran = [r for r in rows.values() if not r["skipped"]]
        if len(ran) > 1 and first is not None:
            last = ran[-1]
            grow = [
                ("points", last["points"] / first["points"]),
                ("time", last["time_s"] / first["time_s"]),
                ("saved", last["peak_saved_bytes"] / first["peak_saved_bytes"]),
                ("peak RSS", last["peak_rss_bytes"] / first["peak_rss_bytes"]),
            ]
            if last["rss_above_bytes"] and first["rss_above_bytes"]:
                grow.append(("RSS above", last["rss_above_bytes"] / first["rss_above_bytes"]))
            lines.append(
                f"growth {first['resolution']}x{first['resolution']} -> "
                f"{last['resolution']}x{last['resolution']}: "
                + ", ".join(f"{label} x{v:.1f}" for label, v in grow)
            )
    lines += ["", f"wall time: {res['wall_s'] / 60:.1f} min"]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--resolutions",
        type=int,
        nargs="+",
        default=[64, 256, 512, 1024],
        help="image sides (default 64 256 512 1024)",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=16384, help="MetaConfig.chunk_size (default 16384)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="extra timed steps at small sizes (default 2)"
    )
    parser.add_argument(
        "--repeat-up-to",
        type=int,
        default=65536,
        help="largest points per image that gets the extra steps (default 65536)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and image")
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=None,
        help="skip runs whose inner graph is predicted above this (default 80%% of MemAvailable, or of the GPU memory with --device cuda)",
    )
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or e.g. 'cuda'")
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(CONFIGS),
        default=None,
        help="configurations to run (default all)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if min(args.resolutions) < 16 or args.chunk_size < 1 or args.threads < 1 or args.repeats < 0:
        parser.error("--resolutions >= 16, --chunk-size >= 1, --threads >= 1, --repeats >= 0")
    if args.device.startswith("cuda") and args.mem_limit_gb is None:
        limit: float | None = 0.8 * torch.cuda.mem_get_info(torch.device(args.device))[1]
    else:
        limit = memory_limit_bytes(args.mem_limit_gb)
    if limit is None:
        parser.error("cannot read MemAvailable; pass --mem-limit-gb")
    results = run(
        resolutions=args.resolutions,
        chunk_size=args.chunk_size,
        threads=args.threads,
        repeats=args.repeats,
        repeat_up_to=args.repeat_up_to,
        seed=args.seed,
        mem_limit_bytes=limit,
        device=args.device,
        configs=args.configs,
    )
    print()
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
