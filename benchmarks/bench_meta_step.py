"""Time and memory of one outer step: MAML (K=16 and K=4, full context) against GradNCP.

Every variant runs in the same process on the same SIREN (5 linear layers x 256, w0=30) and the
same batch of smooth random 64x64 RGB images, so the printed ratios compare like with like.
For each variant:

* **peak saved bytes**: ``ncp.MemoryMeter.peak_saved_bytes`` over one untimed warm-up step
  (tensors saved for backward; device-independent), and with ``--device cuda`` also
  ``peak_cuda_bytes`` (the allocator's peak above what was allocated on entry);
* **time per outer step**: ``ncp.meta_step`` plus ``loss.backward()``, the median of
  ``--repeats`` timed steps (the minimum is printed too). The timed steps go round-robin over
  the variants, so that a change in the machine's load hits every variant alike.

The share of a GradNCP step spent scoring context points is measured two ways:

(a) the same GradNCP step with ``ContextPruner(score="random")``: the inner steps, bootstrap
    and query pass are unchanged in size (the same number of points is kept), and random scores
    cost next to nothing, so ``(t_gradncp - t_random) / t_gradncp`` is the scoring share;
(b) the ``K`` calls of ``ContextPruner().scores`` that a step makes, timed alone on the full
    context at the initial parameters (median over ``--repeats``), over ``t_gradncp``.

Run ``python benchmarks/bench_meta_step.py --help`` for the flags; the default setup takes
about 3 minutes on one CPU thread (MAML K=16 alone is ~20 s a step there and ~5.3 GB of saved
tensors).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Dict

import torch

import ncp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    MB,
    Siren,
    device_name,
    image_batch,
    metered_step,
    outer_step,
    timed,
    warm_up,
)


def run(
    *, resolution: int, tasks: int, repeats: int, threads: int, device: str, seed: int
) -> Dict[str, object]:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = Siren().to(dev)
    x, y = image_batch(resolution, tasks, seed=seed)
    batch = (x.to(dev), y.to(dev))

    gradncp = ncp.MetaConfig()  # K=16, ratio 0.25, bootstrap L=5: the paper's setup
    variants = {
        "MAML K=16, full context": ncp.MetaConfig(inner_steps=16, pruner=None, bootstrap=None),
        "MAML K=4, full context": ncp.MetaConfig(inner_steps=4, pruner=None, bootstrap=None),
        "GradNCP K=16 r=0.25 L=5": gradncp,
        "GradNCP, score='random'": ncp.MetaConfig(pruner=ncp.ContextPruner(score="random")),
        "GradNCP, bf16 scoring": ncp.MetaConfig(
            pruner=ncp.ContextPruner(score_dtype=torch.bfloat16)
        ),
    }
    assert gradncp.pruner is not None and gradncp.bootstrap is not None

    # One cheap step first, so one-time costs (thread pools, cuBLAS handles and workspaces)
    # fall on no variant's warm-up.
    warm_up(model, batch)

    results = {name: metered_step(name, model, batch, cfg, dev) for name, cfg in variants.items()}
    pruner, k = gradncp.pruner, gradncp.inner_steps
    x, y = batch
    pruner.scores(model, x, y)  # warm-up

    def scoring() -> None:  # the K scoring calls of one GradNCP step, on the full context
        for _ in range(k):
            pruner.scores(model, x, y)

    # Round-robin over the variants, so that a change in machine load hits all of them alike.
    score_times = []
    for _ in range(repeats):
        for name, cfg in variants.items():
            results[name].times_s.append(timed(lambda cfg=cfg: outer_step(model, batch, cfg), dev))
            model.zero_grad(set_to_none=True)
        score_times.append(timed(scoring, dev))

    maml16, maml4, ours, rand, low = (results[n] for n in variants)
    agreement = kept_agreement(model, batch, gradncp, variants["GradNCP, bf16 scoring"])
    return {
        "setup": {
            "model": "SIREN 5x256, w0=30, 2->3",
            "resolution": resolution,
            "tasks": tasks,
            "points_per_task": resolution * resolution,
            "dtype": "float32",
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "device": str(dev),
            "device_name": device_name(dev),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "seed": seed,
        },
        "variants": {
            m.name: {
                "time_s": m.time_s,
                "min_time_s": m.min_time_s,
                "times_s": m.times_s,
                "peak_saved_bytes": m.peak_saved_bytes,
                "peak_cuda_bytes": m.peak_cuda_bytes,
            }
            for m in results.values()
        },
        "ratios": {
            "gradncp/maml16": {
                "time": ours.time_s / maml16.time_s,
                "saved_bytes": ours.peak_saved_bytes / maml16.peak_saved_bytes,
                "cuda_bytes": _ratio(ours.peak_cuda_bytes, maml16.peak_cuda_bytes),
            },
            "gradncp_bf16_scoring/maml16": {
                "time": low.time_s / maml16.time_s,
                "saved_bytes": low.peak_saved_bytes / maml16.peak_saved_bytes,
                "cuda_bytes": _ratio(low.peak_cuda_bytes, maml16.peak_cuda_bytes),
            },
            "gradncp/maml4": {
                "time": ours.time_s / maml4.time_s,
                "saved_bytes": ours.peak_saved_bytes / maml4.peak_saved_bytes,
                "cuda_bytes": _ratio(ours.peak_cuda_bytes, maml4.peak_cuda_bytes),
            },
        },
        "scoring": {
            "random_score_step_time_s": rand.time_s,
            "share_by_random_score_step": (ours.time_s - rand.time_s) / ours.time_s,
            "scores_calls_per_step": k,
            "scores_calls_time_s": statistics.median(score_times),
            "scores_calls_times_s": score_times,
            "share_by_timed_scores_calls": statistics.median(score_times) / ours.time_s,
            "bf16_share_by_random_score_step": (low.time_s - rand.time_s) / low.time_s,
            "bf16_kept_agreement": agreement,
        },
    }


def kept_agreement(
    model: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    a: ncp.MetaConfig,
    b: ncp.MetaConfig,
) -> float:
    """Fraction of the points kept over one step's inner steps that ``a`` and ``b`` share."""
    # first order: the inner loop's choices only, without the second-order graph
    ka = ncp.meta_step(model, batch, dataclasses.replace(a, first_order=True)).kept_indices
    kb = ncp.meta_step(model, batch, dataclasses.replace(b, first_order=True)).kept_indices
    assert ka is not None and kb is not None
    rows = zip(ka.flatten(0, 1).tolist(), kb.flatten(0, 1).tolist(), strict=True)
    return sum(len(set(u) & set(v)) for u, v in rows) / ka.numel()


def _ratio(a: int | None, b: int | None) -> float | None:
    return None if a is None or b is None else a / b


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MB:.1f}"


def report(res: Dict[str, object]) -> str:
    s = res["setup"]
    v = res["variants"]
    r = res["ratios"]
    sc = res["scoring"]
    assert isinstance(s, dict) and isinstance(v, dict) and isinstance(r, dict)
    assert isinstance(sc, dict)
    lines = [
        f"ncp meta-step benchmark: {s['model']}, {s['resolution']}x{s['resolution']} RGB "
        f"({s['points_per_task']} points/task), {s['tasks']} tasks, {s['dtype']}",
        f"torch {s['torch']}, python {s['python']}, device {s['device']} ({s['device_name']}), "
        f"threads {s['threads']}",
        f"time: meta_step + backward, median (min) of {s['repeats']} round-robin repeats after "
        "1 warm-up; memory: peak over the warm-up step (1 MB = 1e6 bytes)",
        "",
        f"{'variant':<28}{'time/step (s)':>16}{'min (s)':>9}{'peak saved (MB)':>17}"
        f"{'peak CUDA (MB)':>16}",
    ]
    for name, m in v.items():
        lines.append(
            f"{name:<28}{m['time_s']:>16.3f}{m['min_time_s']:>9.3f}"
            f"{_mb(m['peak_saved_bytes']):>17}{_mb(m['peak_cuda_bytes']):>16}"
        )
    lines += [
        "",
        f"{'ratio (medians)':<28}{'time':>16}{'':>9}{'saved bytes':>17}{'CUDA bytes':>16}",
    ]
    for label, key in (
        ("GradNCP / MAML K=16", "gradncp/maml16"),
        ("GradNCP bf16 score / MAML 16", "gradncp_bf16_scoring/maml16"),
        ("GradNCP / MAML K=4", "gradncp/maml4"),
    ):
        q = r[key]
        cuda = "-" if q["cuda_bytes"] is None else f"{q['cuda_bytes']:.3f}"
        lines.append(f"{label:<28}{q['time']:>16.3f}{'':>9}{q['saved_bytes']:>17.3f}{cuda:>16}")
    lines += [
        "",
        "share of a GradNCP step spent scoring:",
        f"  (a) same step with score='random' ({sc['random_score_step_time_s']:.3f} s): "
        f"(t_gradncp - t_random) / t_gradncp = {sc['share_by_random_score_step']:.1%}",
        f"  (b) {sc['scores_calls_per_step']} calls of ContextPruner().scores on the full context "
        f"({sc['scores_calls_time_s']:.3f} s) / t_gradncp = {sc['share_by_timed_scores_calls']:.1%}",
        f"  (c) with ContextPruner(score_dtype=torch.bfloat16), as (a): "
        f"{sc['bf16_share_by_random_score_step']:.1%}; points kept in common with float32 "
        f"scoring over the K steps of one step (first order, same batch): "
        f"{sc['bf16_kept_agreement']:.1%}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=64, help="image side (default 64)")
    parser.add_argument("--tasks", type=int, default=4, help="images per outer step (default 4)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed steps per variant (default 3)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or e.g. 'cuda'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and images")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.resolution < 2 or args.tasks < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--resolution >= 2, --tasks >= 1, --repeats >= 1, --threads >= 1")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    results = run(
        resolution=args.resolution,
        tasks=args.tasks,
        repeats=args.repeats,
        threads=args.threads,
        device=args.device,
        seed=args.seed,
    )
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
