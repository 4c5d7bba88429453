"""Time and memory of one outer step across image sizes: MAML (K=4, K=16) against GradNCP.

The sweep of ``bench_meta_step.py`` over resolutions, pruning ratios and bootstrap lengths, on
the same SIREN (5 linear layers x 256, w0=30) and the same smooth random RGB images. Variants:
MAML K=16 and K=4 on the full context; GradNCP K=16 with ratio 0.1, 0.25 and 0.5, each with
no bootstrap term (L=0) and with L=5 (ncp's defaults otherwise).

Every variant at every size runs in a fresh Python process (``_common.run_isolated``), which:

1. builds the model and the batch, and runs one step of the variant on the first 256 points
   of each image (warm-up; thread pools, ``vmap`` and ``functional_call`` paths);
2. returns freed heap to the OS and resets the RSS high-water mark, then runs one **metered**
   step (``ncp.MemoryMeter``: peak bytes of tensors saved for backward; untimed, as the first
   full-size step of a process pays for the first touch of its memory), then ``--repeats``
   **timed** steps (``meta_step`` + ``loss.backward()``; the median is reported);
3. reports its **peak RSS** (``VmHWM``) and the RSS it had before the metered step, so that
   "RSS above" is what the steps themselves added.

A variant is run only when its peak RSS, predicted from the largest size it ran at (memory
grows linearly with tasks x points; before any run, from 20.3 KB per point-step), stays under
``--mem-limit-gb`` (default 80 % of the memory available at start). Where MAML K=16 does not
fit it is estimated, marked ``~``, from MAML K=4 measured at that size and the largest smaller
size where both ran: saved bytes as ``saved_4 + 12 * b * points * tasks``, ``b`` the
per-point-step bytes ``(saved_16 - saved_4) / (12 * points * tasks)`` measured there; time as
``t_4 * t_16 / t_4`` with the ratio measured there (seconds per point-step change with the size
on CPU, bytes do not); peak RSS as MAML K=4's plus the extra saved bytes.

Variants run one after another (not round-robin as in ``bench_meta_step.py``): single-repeat
times on a shared 2-core VM vary by 10-20 % from run to run, so read the ratios, not the last
digit. ``--from-json`` reprints a saved run. Run ``python benchmarks/bench_sweep.py --help``
for the flags; the defaults (64x64 with 4 tasks and 2 repeats, then 178x178 and 256x256 with
1 task and 1 repeat, two threads) take about 13 minutes on a 2-core x86 CPU.
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
    fmt_ratio,
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

MAML16, MAML4 = "MAML K=16", "MAML K=4"


def variants() -> Dict[str, Dict[str, Any]]:
    """Name -> ``{"k", "ratio" (None: full context), "bootstrap_steps" (0: none)}``."""
    out: Dict[str, Dict[str, Any]] = {
        MAML16: {"k": 16, "ratio": None, "bootstrap_steps": 0},
        MAML4: {"k": 4, "ratio": None, "bootstrap_steps": 0},
    }
    for ratio in (0.1, 0.25, 0.5):
        for steps in (0, 5):
            out[f"GradNCP K=16 r={ratio:g} L={steps}"] = {
                "k": 16,
                "ratio": ratio,
                "bootstrap_steps": steps,
            }
    return out


def config(variant: Mapping[str, Any], chunk_size: int | None = None) -> ncp.MetaConfig:
    pruner = None if variant["ratio"] is None else ncp.ContextPruner(ratio=variant["ratio"])
    steps = variant["bootstrap_steps"]
    bootstrap = ncp.BootstrapMetaLoss(steps=steps) if steps else None
    return ncp.MetaConfig(
        inner_steps=variant["k"], pruner=pruner, bootstrap=bootstrap, chunk_size=chunk_size
    )


def measure(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """One variant at one size, in its own process (see the module docstring)."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    dev = torch.device("cpu")
    model = Siren()
    x, y = image_batch(spec["resolution"], spec["tasks"], seed=spec["seed"])
    cfg = config(spec["variant"], spec["chunk_size"])
    n = min(x.shape[1], 256)
    outer_step(model, (x[:, :n], y[:, :n]), cfg)  # warm-up
    model.zero_grad(set_to_none=True)

    trim_heap()
    base = rss_bytes()
    reset = reset_peak_rss()
    start = time.perf_counter()
    metered = metered_step(spec["name"], model, (x, y), cfg, dev)
    metered_s = time.perf_counter() - start
    times = []
    for _ in range(spec["repeats"]):
        times.append(timed(lambda: outer_step(model, (x, y), cfg), dev))
        model.zero_grad(set_to_none=True)
    return {
        "times_s": times,
        "time_s": statistics.median(times) if times else metered_s,
        "metered_step_s": metered_s,
        "peak_saved_bytes": metered.peak_saved_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
        "setup_rss_bytes": base,
        "peak_rss_reset": reset,
        "threads": torch.get_num_threads(),
    }


def _above(m: Mapping[str, Any]) -> float | None:
    if m.get("setup_rss_bytes") is None or not m.get("peak_rss_reset", False):
        return None
    return m["peak_rss_bytes"] - m["setup_rss_bytes"]


def predicted_rss(ref: Mapping[str, Any], scale: float) -> float:
    """Peak RSS at ``scale`` x the (tasks x points) of the reference measurement ``ref``."""
    above = _above(ref)
    if above is None:
        return ref["peak_rss_bytes"] * scale
    return ref["setup_rss_bytes"] + above * scale


def first_guess_rss(variant: Mapping[str, Any], points: int) -> float:
    """Peak RSS before anything was measured: 20.3 KB per point-step of the inner graph (SIREN
    5x256, float32), times 1.5 for what RSS holds beyond the saved tensors, plus 0.4 GB."""
    kept = points * (1.0 if variant["ratio"] is None else variant["ratio"])
    return 0.4e9 + 1.5 * 20.3e3 * variant["k"] * kept


def _measured(m: Mapping[str, Any] | None) -> bool:
    return m is not None and not m.get("skipped", True)


def add_estimates(results: Mapping[str, Any]) -> None:
    """Fill in MAML K=16 wherever it was skipped but MAML K=4 ran, from the largest earlier size
    where both ran (the reference): saved bytes from the per-point-step bytes there
    (``saved_4 + 12 * b * points * tasks``), time as ``t_4`` here times ``t_16 / t_4`` there
    (the seconds per point-step change with the size, the bytes do not), and peak RSS as MAML
    K=4's plus the extra saved bytes."""
    ref: tuple[int, int, Mapping[str, Any], Mapping[str, Any]] | None = None
    for r in results.values():
        rows, pts = r["variants"], r["resolution"] ** 2 * r["tasks"]
        m16, m4 = rows[MAML16], rows[MAML4]
        if _measured(m16) and _measured(m4):
            ref = (pts, r["resolution"], m16, m4)
            continue
        if ref is None or not _measured(m4) or _measured(m16):
            continue
        ref_pts, ref_res, r16, r4 = ref
        per_byte = (r16["peak_saved_bytes"] - r4["peak_saved_bytes"]) / (12 * ref_pts)
        saved = m4["peak_saved_bytes"] + 12 * per_byte * pts
        m16.update(
            {
                "estimated": True,
                "reference_resolution": ref_res,
                "time_s": m4["time_s"] * r16["time_s"] / r4["time_s"],
                "peak_saved_bytes": saved,
                "peak_rss_bytes": m4["peak_rss_bytes"] + (saved - m4["peak_saved_bytes"]),
                "setup_rss_bytes": m4.get("setup_rss_bytes"),
                "peak_rss_reset": m4.get("peak_rss_reset", False),
                "per_point_step_bytes": per_byte,
                "time_ratio_16_to_4": r16["time_s"] / r4["time_s"],
            }
        )


def run(
    *,
    sizes: List[int],
    tasks: List[int],
    repeats: List[int],
    threads: int,
    seed: int,
    mem_limit_bytes: float,
    chunk_size: int | None = None,
) -> Dict[str, Any]:
    torch.set_num_threads(threads)
    env = environment("cpu")
    start = time.perf_counter()
    table = variants()
    results: Dict[str, Any] = {}
    last: Dict[str, tuple[int, Dict[str, Any]]] = {}  # largest measured (points, result)
    for res, t, rep in zip(sizes, tasks, repeats, strict=True):
        pts = res * res * t
        rows: Dict[str, Any] = {}
        for name, variant in table.items():
            if name in last:
                ref_pts, ref = last[name]
                predicted = predicted_rss(ref, pts / ref_pts)
            else:
                predicted = first_guess_rss(variant, pts)
            if predicted > mem_limit_bytes:
                rows[name] = {"skipped": True, "predicted_rss_bytes": predicted}
                print(
                    f"  {res}x{res} {name}: skipped, predicted peak RSS "
                    f"{predicted / GB:.1f} GB > limit {mem_limit_bytes / GB:.1f} GB",
                    flush=True,
                )
                continue
            spec = {
                "name": name,
                "variant": variant,
                "resolution": res,
                "tasks": t,
                "repeats": rep,
                "threads": threads,
                "seed": seed,
                "chunk_size": chunk_size,
            }
            m = run_isolated("bench_sweep", "measure", spec)
            m.update(skipped=False, predicted_rss_bytes=predicted)
            rows[name] = m
            last[name] = (pts, m)
            print(
                f"  {res}x{res} {name}: {m['time_s']:.2f} s/step, saved "
                f"{m['peak_saved_bytes'] / MB:.0f} MB, peak RSS {m['peak_rss_bytes'] / MB:.0f} MB",
                flush=True,
            )
        results[f"{res}"] = {"resolution": res, "tasks": t, "repeats": rep, "variants": rows}
    add_estimates(results)
    return {
        "setup": {
            "model": "SIREN 5x256, w0=30, 2->3",
            "dtype": "float32",
            "seed": seed,
            "chunk_size": chunk_size,
            "mem_limit_bytes": mem_limit_bytes,
            **env,
        },
        "sizes": results,
        "ratios": ratios(results),
        "wall_s": time.perf_counter() - start,
        "load_average_1min_end": environment("cpu")["load_average_1min"],
    }


def _ratio(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> float | None:
    if a.get("skipped") and not a.get("estimated"):
        return None
    if b.get("skipped") and not b.get("estimated"):
        return None
    if key == "rss_above":
        num, den = _above(a), _above(b)
        return None if num is None or den is None else num / den
    return a[key] / b[key]


def ratios(results: Mapping[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for size, r in results.items():
        rows = r["variants"]
        out[size] = {
            name: {
                f"/{base}": {
                    "estimated": bool(rows[base].get("estimated")),
                    **{
                        key: _ratio(m, rows[base], key)
                        for key in ("time_s", "peak_saved_bytes", "peak_rss_bytes", "rss_above")
                    },
                }
                for base in (MAML16, MAML4)
            }
            for name, m in rows.items()
            if name not in (MAML16, MAML4)
        }
    return out


def report(res: Mapping[str, Any]) -> str:
    s = res["setup"]
    lines = [
        header(
            f"ncp outer-step sweep: {s['model']}, {s['dtype']}, chunk_size={s.get('chunk_size')}, "
            "one fresh process per variant",
            s,
            res["load_average_1min_end"],
        ),
        "time: meta_step + backward, median of the timed steps after a warm-up and a metered "
        "step; saved: ncp.MemoryMeter peak; RSS: peak (VmHWM) of the variant's process, and "
        "its peak above the RSS before the metered step (1 MB = 1e6 bytes)",
        "~ : estimated, not run (predicted not to fit under the memory limit of "
        f"{s['mem_limit_bytes'] / GB:.1f} GB); see the module docstring",
    ]
    for size, r in res["sizes"].items():
        rows = r["variants"]
        n = r["resolution"]
        lines += [
            "",
            f"{n}x{n} RGB ({n * n} points/task), {r['tasks']} task(s), "
            f"{r['repeats']} timed repeat(s)",
            f"{'variant':<26}{'time/step (s)':>14}{'saved (MB)':>12}{'peak RSS (MB)':>15}"
            f"{'RSS above (MB)':>16}",
        ]
        for name, m in rows.items():
            if m.get("skipped") and not m.get("estimated"):
                lines.append(
                    f"{name:<26}{'not run: predicted peak RSS':>42} "
                    f"{m['predicted_rss_bytes'] / MB:.0f} MB"
                )
                continue
            mark = "~" if m.get("estimated") else ""
            above = _above(m)
            lines.append(
                f"{name:<26}{mark + format(m['time_s'], '.2f'):>14}"
                f"{mark + fmt_bytes(m['peak_saved_bytes']):>12}"
                f"{mark + fmt_bytes(m['peak_rss_bytes']):>15}"
                f"{mark + fmt_bytes(above):>16}"
            )
        lines += [
            "",
            f"{'ratio':<26}{'to':>10}{'time':>8}{'saved':>8}{'RSS':>8}{'RSS above':>11}",
        ]
        for name, per_base in res["ratios"][size].items():
            for base, q in per_base.items():
                mark = "~" if q["estimated"] else ""
                cells = [
                    q["time_s"],
                    q["peak_saved_bytes"],
                    q["peak_rss_bytes"],
                    q["rss_above"],
                ]
                text = [("-" if c is None else mark + fmt_ratio(c)) for c in cells]
                lines.append(
                    f"{name:<26}{base[1:]:>10}{text[0]:>8}{text[1]:>8}{text[2]:>8}{text[3]:>11}"
                )
        m16 = rows[MAML16]
        if m16.get("estimated"):
            ref = m16["reference_resolution"]
            lines.append(
                f"(MAML K=16 estimated from MAML K=4 here, with {m16['per_point_step_bytes'] / 1e3:.1f}"
                f" KB per point-step and t_16 / t_4 = {m16['time_ratio_16_to_4']:.3f} measured at "
                f"{ref}x{ref})"
            )
    lines += ["", f"sweep wall time: {res['wall_s'] / 60:.1f} min"]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[64, 178, 256], help="image sides, ascending"
    )
    parser.add_argument(
        "--tasks", type=int, nargs="+", default=[4, 1, 1], help="images per step, one per size"
    )
    parser.add_argument(
        "--repeats", type=int, nargs="+", default=[2, 1, 1], help="timed steps, one per size"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and images")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="MetaConfig.chunk_size for every variant"
    )
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=None,
        help="skip variants predicted to peak above this RSS (default 80%% of MemAvailable)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="print the report of a saved run instead of running (estimates are redone)",
    )
    args = parser.parse_args()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        for size in saved["sizes"].values():
            for name, m in size["variants"].items():
                if m.get("estimated"):
                    size["variants"][name] = {
                        "skipped": True,
                        "predicted_rss_bytes": m["predicted_rss_bytes"],
                    }
        add_estimates(saved["sizes"])
        saved["ratios"] = ratios(saved["sizes"])
        print(report(saved))
        sys.exit(0)
    if not (len(args.sizes) == len(args.tasks) == len(args.repeats)):
        parser.error("--sizes, --tasks and --repeats need one value per size")
    if args.sizes != sorted(args.sizes) or min(args.sizes) < 16:
        parser.error("--sizes must be ascending and >= 16 (the warm-up uses 256 points)")
    if min(args.tasks) < 1 or min(args.repeats) < 0 or args.threads < 1:
        parser.error("--tasks >= 1, --repeats >= 0, --threads >= 1")
    limit = memory_limit_bytes(args.mem_limit_gb)
    if limit is None:
        parser.error("cannot read MemAvailable; pass --mem-limit-gb")
    results = run(
        sizes=args.sizes,
        tasks=args.tasks,
        repeats=args.repeats,
        threads=args.threads,
        seed=args.seed,
        mem_limit_bytes=limit,
        chunk_size=args.chunk_size,
    )
    print()
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
