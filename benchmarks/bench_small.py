"""Small contexts (few-shot regression and classification): GradNCP's step against MAML K=16.

With 10 to 500 points per task a step is made of many small operations, and what GradNCP adds
to MAML (scoring the context, selecting the top-k, the bootstrap's full-context steps) is paid
per operation rather than per point. This script measures, in one process and round-robin over
the variants (so a change of load hits all alike):

* **sinusoid regression** (Finn et al., 2017): MLP 1 -> 40 -> 40 -> 1, 25 tasks per step,
  ``--points`` context points per task (default 10 100 500);
* **5-way 100-shot classification**: Conv4 with 16 filters on 16x16 grey images (group norm),
  2 tasks of 500 support and 75 query points (``--no-conv`` skips it).

Variants: MAML K=16 (full context); GradNCP K=16, ratio 0.25, L=5 (the paper's); the same with
``score="random"`` (selection without scoring: its difference to GradNCP is the scoring cost);
the same without bootstrap (L=0). The scoring + selection share of a GradNCP step is measured
directly too: the K ``Selector`` calls of a step, timed alone at the initial parameters, over
the step time. Printed: median seconds per step (``meta_step`` + ``backward``) and each
variant's ratio to MAML K=16.

Run ``python benchmarks/bench_small.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn

import ncp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, header

K, RATIO, L = 16, 0.25, 5


def sinusoid_batch(tasks: int, points: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``tasks`` sinusoids ``a sin(x + b)``, ``points`` inputs each on [-5, 5]."""
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(tasks, 1, 1, generator=g) * 4.9 + 0.1
    phase = torch.rand(tasks, 1, 1, generator=g) * torch.pi
    x = torch.rand(tasks, points, 1, generator=g) * 10 - 5
    return x, amp * torch.sin(x + phase)


def sinusoid_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def conv4(ways: int = 5, hidden: int = 16) -> nn.Module:
    layers: List[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(4, hidden), nn.ReLU()]
        layers += [nn.MaxPool2d(2)]
        channels = hidden
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden, ways))


def episode(tasks: int, ways: int, shots: int, queries: int, seed: int) -> Tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    n, q = ways * shots, ways * queries
    return (
        torch.rand(tasks, n, 1, 16, 16, generator=g),
        torch.arange(ways).repeat_interleave(shots).expand(tasks, n).contiguous(),
        torch.rand(tasks, q, 1, 16, 16, generator=g),
        torch.arange(ways).repeat_interleave(queries).expand(tasks, q).contiguous(),
    )


def variants(loss_fn: Callable[..., Tensor], strategy: str = "auto") -> Dict[str, ncp.MetaConfig]:
    gradncp = ncp.MetaConfig(
        inner_steps=K,
        pruner=ncp.ContextPruner(ratio=RATIO, strategy=strategy),  # type: ignore[arg-type]
        bootstrap=ncp.BootstrapMetaLoss(steps=L),
        loss_fn=loss_fn,
    )
    return {
        "MAML K=16": dataclasses.replace(gradncp, pruner=None, bootstrap=None),
        "GradNCP": gradncp,
        "GradNCP random score": dataclasses.replace(
            gradncp, pruner=ncp.ContextPruner(ratio=RATIO, score="random")
        ),
        "GradNCP L=0": dataclasses.replace(gradncp, bootstrap=None),
    }


def step(model: nn.Module, batch: Tuple[Tensor, ...], cfg: ncp.MetaConfig) -> None:
    ncp.meta_step(model, batch, cfg).loss.backward()
    model.zero_grad(set_to_none=True)


def selection_seconds(
    model: nn.Module, batch: Tuple[Tensor, ...], cfg: ncp.MetaConfig, repeats: int
) -> float:
    """The K scoring + selection calls of one step, at the initial parameters (median)."""
    assert cfg.pruner is not None
    x, y = batch[0], batch[1]
    selector = cfg.pruner.prepare(model, x, y, loss_fn=cfg.loss_fn)
    params = ncp.functional.init_params(model, x.shape[0])
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(cfg.inner_steps):
                selector(params, x, y)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    model: nn.Module, batch: Tuple[Tensor, ...], cfgs: Dict[str, ncp.MetaConfig], repeats: int
) -> Dict[str, Any]:
    for cfg in cfgs.values():  # warm-up
        step(model, batch, cfg)
    times: Dict[str, List[float]] = {name: [] for name in cfgs}
    for _ in range(repeats):
        for name, cfg in cfgs.items():
            start = time.perf_counter()
            step(model, batch, cfg)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    select = selection_seconds(model, batch, cfgs["GradNCP"], repeats)
    return {
        "median_s": med,
        "min_s": {name: min(t) for name, t in times.items()},
        "ratio_to_maml": {name: med[name] / med["MAML K=16"] for name in med},
        "selection_s": select,
        "selection_share": select / med["GradNCP"],
    }


def run(
    points: List[int], conv: bool, repeats: int, seed: int, strategy: str = "auto"
) -> Dict[str, Any]:
    out: Dict[str, Any] = {"sinusoid": {}, "env": environment("cpu"), "strategy": strategy}
    torch.manual_seed(seed)
    model = sinusoid_model()
    cfgs = variants(ncp.losses.mse, strategy)
    for n in points:
        out["sinusoid"][str(n)] = measure(model, sinusoid_batch(25, n, seed), cfgs, repeats)
        print(f"  sinusoid {n} points: done", file=sys.stderr, flush=True)
    if conv:
        torch.manual_seed(seed)
        out["conv4 5w100s"] = measure(
            conv4(),
            episode(2, 5, 100, 15, seed),
            variants(ncp.losses.cross_entropy, strategy),
            repeats,
        )
    out["load_average_1min_end"] = environment("cpu")["load_average_1min"]
    return out


def report(res: Dict[str, Any]) -> str:
    lines = [
        header(
            "ncp small-context benchmark: seconds per outer step (meta_step + backward), "
            f"median; ratio to MAML K=16; scoring strategy {res['strategy']!r}",
            res["env"],
            res["load_average_1min_end"],
        )
    ]
    rows = [(f"sinusoid, 25 tasks x {n} points", r) for n, r in res["sinusoid"].items()]
    if "conv4 5w100s" in res:
        rows.append(("Conv4-16, 2 tasks x 500 support (5w100s)", res["conv4 5w100s"]))
    names = list(rows[0][1]["median_s"])
    lines.append("| setting | " + " | ".join(names) + " | scoring + selection share |")
    lines.append("| --- |" + " ---: |" * (len(names) + 1))
    for title, r in rows:
        cells = [f"{r['median_s'][n] * 1e3:.0f} ms ({r['ratio_to_maml'][n]:.2f}x)" for n in names]
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {r['selection_share']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant (7)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--no-conv", dest="conv", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--strategy",
        choices=("auto", "loop", "vmap"),
        default="auto",
        help="ContextPruner.strategy ('loop' was the CPU default before ncp 0.3)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if min(args.points) < 4 or args.repeats < 1 or args.threads < 1:
        parser.error("--points >= 4, --repeats >= 1, --threads >= 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=ncp.SmallContextWarning)  # 10 points on purpose
    res = run(args.points, args.conv, args.repeats, args.seed, args.strategy)
    print(report(res))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
