"""GradNCP scoring: ncp's closed form against the paper's materialised per-point gradients.

The GradNCP score of a context point is the norm of its loss gradient with respect to the last
linear layer ``z = W phi + b`` (paper Eq. 2). Two ways to compute it, on the same SIREN
(5 linear layers, width ``F`` = 256 or 1024, w0=30) and the same smooth random RGB images:

* **ncp**: ``ncp.ContextPruner().scores(model, x, y)``, the closed form
  ``||dl/dz|| * sqrt(||phi||^2 + 1)``: one forward pass per task, then O(points) work;
* **paper**: the official code's way, re-implemented here: one batched forward pass, then the
  per-point last-layer gradient tensor of shape ``(tasks, outputs, F + 1, points)`` (the outer
  product of ``dl/dz`` and ``[phi, 1]``) and its norm over ``(outputs, F + 1)``. It uses the
  error ``y - z`` as ``dl/dz``, as the official code does; ncp differentiates the per-point loss
  ``ncp.losses.mse`` (the squared error averaged over the ``O`` outputs), whose ``dl/dz`` is
  ``2 (z - y) / O``, so the paper's scores are ``O / 2`` times ncp's (1.5 for RGB). The ratio
  observed is printed. (The official code also concatenates the weight and bias gradients
  into a second full-size copy; the baseline here does not, so it is a little leaner.)

For each method, width and context size, in a fresh process (``_common.run_isolated``):

* **time**: the whole call (forward pass and scores), median of up to ``--repeats`` calls,
  stopping once ``--max-seconds`` have been spent (at least one call); and the **head part**
  alone (scores from given ``phi`` and ``dl/dz``, the part the two methods do differently);
* **memory**: peak RSS above the RSS before the first timed call (high-water mark reset there),
  and the bytes of the largest tensor each method creates, counted from the shapes:
  ``points x F x 4`` for ncp (one task's ``phi``), ``tasks x outputs x (F + 1) x points x 4``
  for the paper's gradient tensor. For the head part alone the RSS it adds is read the same
  way, after ``phi`` and ``dl/dz`` exist;
* **check**: on the first 16,384 points, the paper's scores over ncp's (should be ``O / 2``)
  and the overlap of the top 25 % point sets.

Run ``python benchmarks/bench_scoring.py --help`` for the flags; the defaults (1k to 256k
points, widths 256 and 1024, one task, one thread) take about 5 minutes on a 2-core x86 CPU.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping

import torch
from torch import Tensor

import ncp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Siren,
    environment,
    fmt_bytes,
    header,
    image_batch,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_isolated,
    trim_heap,
)

CHECK_POINTS = 16384
OUTPUTS = 3


def materialised_head_scores(phi: Tensor, dl_dz: Tensor) -> Tensor:
    """Norm of the per-point last-layer gradient, built explicitly.

    Args:
        phi: head inputs ``(tasks, points, features)``.
        dl_dz: ``(tasks, points, outputs)``.

    Returns:
        ``(tasks, points)``; creates a ``(tasks, outputs, features + 1, points)`` tensor.
    """
    ones = phi.new_ones(*phi.shape[:2], 1)
    phi1 = torch.cat([phi, ones], dim=-1).transpose(1, 2)  # (tasks, F + 1, points)
    grad = dl_dz.transpose(1, 2).unsqueeze(2) * phi1.unsqueeze(1)  # (tasks, O, F + 1, points)
    return grad.flatten(1, 2).norm(dim=1)


def paper_scores(model: Siren, x: Tensor, y: Tensor) -> Tensor:
    """The official code's scoring: error ``y - z`` as ``dl/dz``, materialised gradients."""
    body, head = model.net[:-1], model.net[-1]
    with torch.no_grad():
        phi = body(x)
        error = y - head(phi)
        return materialised_head_scores(phi, -error)


def ncp_scores(model: Siren, x: Tensor, y: Tensor) -> Tensor:
    return ncp.ContextPruner().scores(model, x, y)


def closed_form_head_scores(phi: Tensor, dl_dz: Tensor) -> Tensor:
    """ncp's closed form on given ``phi`` and ``dl/dz`` (one task at a time, as ncp runs)."""
    return torch.stack(
        [ncp.functional.linear_head_score(phi[i], dl_dz[i]) for i in range(phi.shape[0])]
    )


METHODS: Dict[str, Callable[[Siren, Tensor, Tensor], Tensor]] = {
    "ncp": ncp_scores,
    "paper": paper_scores,
}
HEADS: Dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ncp": closed_form_head_scores,
    "paper": materialised_head_scores,
}


def _timed_calls(fn: Callable[[], object], repeats: int, max_seconds: float) -> List[float]:
    times: List[float] = []
    while len(times) < repeats and (not times or sum(times) < max_seconds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _head_part(
    model: Siren,
    x: Tensor,
    y: Tensor,
    head_score: Callable[[Tensor, Tensor], Tensor],
    spec: Mapping[str, Any],
) -> Dict[str, Any]:
    """Time and RSS of the scores from given ``phi`` and ``dl/dz`` (``ncp.losses.mse``'s)."""
    with torch.no_grad():
        phi = model.net[:-1](x)
        dl_dz = 2 * (model.net[-1](phi) - y) / y.shape[-1]
    head_score(phi[:, :256], dl_dz[:, :256])  # warm-up
    trim_heap()
    base = rss_bytes()
    reset = reset_peak_rss()
    times = _timed_calls(lambda: head_score(phi, dl_dz), spec["repeats"], spec["max_seconds"])
    peak = peak_rss_bytes()
    return {
        "head_times_s": times,
        "head_time_s": statistics.median(times),
        "head_rss_above_bytes": peak - base if reset and base is not None else None,
    }


def measure(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """One method at one width and context size, in its own process."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    method = spec["method"]
    model = Siren(hidden=spec["features"])
    x, y = image_batch(spec["resolution"], spec["tasks"], seed=spec["seed"])
    score, head_score = METHODS[method], HEADS[method]
    score(model, x[:, :256], y[:, :256])  # warm-up

    trim_heap()
    base = rss_bytes()
    reset = reset_peak_rss()
    times = _timed_calls(lambda: score(model, x, y), spec["repeats"], spec["max_seconds"])
    peak = peak_rss_bytes()

    head = _head_part(model, x, y, head_score, spec)

    n = min(x.shape[1], CHECK_POINTS)
    ours = ncp_scores(model, x[:, :n], y[:, :n])
    theirs = paper_scores(model, x[:, :n], y[:, :n])
    ratio = theirs / ours
    k = max(1, n // 4)
    top_ours = torch.topk(ours, k, dim=1).indices
    top_theirs = torch.topk(theirs, k, dim=1).indices
    overlap = statistics.mean(
        len(set(a.tolist()) & set(b.tolist())) / k
        for a, b in zip(top_ours, top_theirs, strict=True)
    )
    return {
        "times_s": times,
        "time_s": statistics.median(times),
        **head,
        "rss_above_bytes": peak - base if reset and base is not None else None,
        "peak_rss_bytes": peak,
        "check_points": n,
        "paper_over_ncp_median": ratio.median().item(),
        "paper_over_ncp_min": ratio.min().item(),
        "paper_over_ncp_max": ratio.max().item(),
        "top25_overlap": overlap,
    }


def largest_tensor_bytes(method: str, tasks: int, points: int, features: int) -> int:
    if method == "ncp":
        return points * features * 4  # one task's phi (float32)
    return tasks * OUTPUTS * (features + 1) * points * 4


def run(
    *,
    resolutions: List[int],
    widths: List[int],
    tasks: int,
    repeats: int,
    max_seconds: float,
    threads: int,
    seed: int,
) -> Dict[str, Any]:
    torch.set_num_threads(threads)
    env = environment("cpu")
    start = time.perf_counter()
    rows = []
    for width in widths:
        for res in resolutions:
            row: Dict[str, Any] = {"features": width, "resolution": res, "points": res * res}
            for method in METHODS:
                spec = {
                    "method": method,
                    "features": width,
                    "resolution": res,
                    "tasks": tasks,
                    "repeats": repeats,
                    "max_seconds": max_seconds,
                    "threads": threads,
                    "seed": seed,
                }
                m = run_isolated("bench_scoring", "measure", spec)
                m["largest_tensor_bytes"] = largest_tensor_bytes(method, tasks, res * res, width)
                row[method] = m
            rows.append(row)
            print(
                f"  F={width} points={res * res}: ncp {row['ncp']['time_s']:.3f} s, "
                f"paper {row['paper']['time_s']:.3f} s",
                flush=True,
            )
    return {
        "setup": {
            "model": "SIREN 5 layers, w0=30, 2->3",
            "tasks": tasks,
            "dtype": "float32",
            "seed": seed,
            "repeats": repeats,
            "max_seconds": max_seconds,
            **env,
        },
        "rows": rows,
        "wall_s": time.perf_counter() - start,
        "load_average_1min_end": environment("cpu")["load_average_1min"],
    }


def _div(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.3f}"


def report(res: Mapping[str, Any]) -> str:
    s = res["setup"]
    lines = [
        header(
            f"ncp scoring benchmark: {s['model']}, {s['tasks']} task(s), {s['dtype']}, one "
            "fresh process per method and size",
            s,
            res["load_average_1min_end"],
        ),
        f"time: median of up to {s['repeats']} calls (stopping after {s['max_seconds']:g} s); "
        "RSS: peak above the RSS before the first timed call; largest: bytes of the largest "
        "tensor created, from its shape (1 MB = 1e6 bytes)",
        "",
        "whole call (forward pass + scores)",
        f"{'F':>5}{'points':>8} | {'ncp (s)':>9}{'paper (s)':>10}{'ratio':>7} | "
        f"{'ncp RSS':>8}{'paper RSS':>10}{'ratio':>7} | {'ncp largest':>12}"
        f"{'paper largest':>14} | {'ncp RSS / phi':>14}",
    ]
    for r in res["rows"]:
        a, b = r["ncp"], r["paper"]
        lines.append(
            f"{r['features']:>5}{r['points']:>8} | {a['time_s']:>9.4f}{b['time_s']:>10.4f}"
            f"{_div(a['time_s'], b['time_s']):>7} | {fmt_bytes(a['rss_above_bytes']):>8}"
            f"{fmt_bytes(b['rss_above_bytes']):>10}"
            f"{_div(a['rss_above_bytes'], b['rss_above_bytes']):>7} | "
            f"{fmt_bytes(a['largest_tensor_bytes']):>12}{fmt_bytes(b['largest_tensor_bytes']):>14}"
            f" | {_div(a['rss_above_bytes'], a['largest_tensor_bytes']):>14}"
        )
    lines += [
        "",
        "head part alone (scores from given phi and dl/dz)",
        f"{'F':>5}{'points':>8} | {'ncp (s)':>9}{'paper (s)':>10}{'ratio':>7} | "
        f"{'ncp RSS':>8}{'paper RSS':>10}",
    ]
    for r in res["rows"]:
        a, b = r["ncp"], r["paper"]
        lines.append(
            f"{r['features']:>5}{r['points']:>8} | {a['head_time_s']:>9.4f}"
            f"{b['head_time_s']:>10.4f}{_div(a['head_time_s'], b['head_time_s']):>7} | "
            f"{fmt_bytes(a['head_rss_above_bytes']):>8}{fmt_bytes(b['head_rss_above_bytes']):>10}"
        )
    lines += [
        "",
        f"check on the first {CHECK_POINTS} points: paper / ncp scores (expected "
        f"{OUTPUTS}/2 = {OUTPUTS / 2:g}) and top-25 % overlap",
    ]
    for r in res["rows"]:
        b = r["paper"]
        lines.append(
            f"{r['features']:>5}{r['points']:>8} | median {b['paper_over_ncp_median']:.7f}, "
            f"range [{b['paper_over_ncp_min']:.7f}, {b['paper_over_ncp_max']:.7f}], "
            f"top-25 % overlap {b['top25_overlap']:.4f}"
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
        default=[32, 64, 128, 256, 512],
        help="image sides (default 32..512: 1k to 256k points)",
    )
    parser.add_argument(
        "--widths", type=int, nargs="+", default=[256, 1024], help="SIREN hidden widths"
    )
    parser.add_argument("--tasks", type=int, default=1, help="images scored per call (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls at most (default 3)")
    parser.add_argument(
        "--max-seconds", type=float, default=20.0, help="stop repeating after this (default 20)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and images")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if min(args.resolutions) < 16 or args.tasks < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--resolutions >= 16, --tasks >= 1, --repeats >= 1, --threads >= 1")
    results = run(
        resolutions=args.resolutions,
        widths=args.widths,
        tasks=args.tasks,
        repeats=args.repeats,
        max_seconds=args.max_seconds,
        threads=args.threads,
        seed=args.seed,
    )
    print()
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
