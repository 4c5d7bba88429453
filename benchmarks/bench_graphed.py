"""A GradNCP step recorded as a CUDA graph (``ncp.GraphedMetaStep``) against MAML K=16.

On a GPU a GradNCP step on a small context is launch-bound: at 64x64 with 4 tasks it took 1.51x
MAML K=16's time on an H100 (docs/benchmarks.md), because its scoring passes, kept-point steps
and bootstrap steps are ~2,000 small kernels. Recording the step once and replaying it removes
the per-kernel launch cost. This script times, in one process and round-robin:

* MAML K=16 and GradNCP (K=16, ratio 0.25, L=5), each eager (``meta_step`` + ``backward``)
  and recorded (``GraphedMetaStep``, a replay per step);

and prints GradNCP's time over MAML K=16's, eager and recorded (the issue's target: a
recorded GradNCP step no slower than eager MAML K=16 at 64x64, and <= 0.40x at 178x178).
Without CUDA the "recorded" rows run ``GraphedMetaStep(capture=False)``, i.e. eagerly: that
checks the script, not the speed-up.

Run ``python benchmarks/bench_graphed.py --device cuda --resolution 64`` (about a minute on a
GPU; ``--resolution 16 --repeats 1`` on a CPU for a dry run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List

import torch

import ncp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Siren, environment, header, image_batch, outer_step, timed, warm_up

CONFIGS = {
    "MAML K=16": ncp.MetaConfig(inner_steps=16, pruner=None, bootstrap=None),
    "GradNCP K=16 r=0.25 L=5": ncp.MetaConfig(),
}


def run(args: argparse.Namespace) -> Dict[str, object]:
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = Siren().to(dev)
    x, y = image_batch(args.resolution, args.tasks, seed=args.seed)
    batch = (x.to(dev), y.to(dev))
    warm_up(model, batch)
    capture = dev.type == "cuda"
    steps = {}
    for name, cfg in CONFIGS.items():
        steps[f"{name}, eager"] = lambda cfg=cfg: outer_step(model, batch, cfg)
        graphed = ncp.GraphedMetaStep(model, batch, cfg, capture=capture)
        steps[f"{name}, recorded"] = lambda g=graphed: g(batch)
    for fn in steps.values():  # one untimed call each (the recorded ones are warm already)
        fn()
        model.zero_grad(set_to_none=True)
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            times[name].append(timed(fn, dev))
            model.zero_grad(set_to_none=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    maml, ncp_ = "MAML K=16", "GradNCP K=16 r=0.25 L=5"
    return {
        "setup": {**{k: v for k, v in vars(args).items() if k != "json"}, "captured": capture},
        "env": environment(dev),
        "times_s": times,
        "median_s": med,
        "ratios": {
            "gradncp recorded / maml eager": med[f"{ncp_}, recorded"] / med[f"{maml}, eager"],
            "gradncp recorded / maml recorded": med[f"{ncp_}, recorded"] / med[f"{maml}, recorded"],
            "gradncp eager / maml eager": med[f"{ncp_}, eager"] / med[f"{maml}, eager"],
            "gradncp recorded / gradncp eager": med[f"{ncp_}, recorded"] / med[f"{ncp_}, eager"],
        },
    }


def report(res: Dict[str, object]) -> str:
    s, med, ratios = res["setup"], res["median_s"], res["ratios"]
    assert isinstance(s, dict) and isinstance(med, dict) and isinstance(ratios, dict)
    lines = [
        header(
            f"ncp recorded-step benchmark: SIREN 5x256, {s['resolution']}x{s['resolution']} RGB, "
            f"{s['tasks']} tasks; median of {s['repeats']} round-robin steps"
            + ("" if s["captured"] else " (no CUDA: 'recorded' rows ran eagerly)"),
            res["env"],  # type: ignore[arg-type]
        ),
        f"{'variant':<36}{'time/step (s)':>15}",
    ]
    lines += [f"{name:<36}{t:>15.4f}" for name, t in med.items()]
    lines += [f"{name}: {v:.3f}" for name, v in ratios.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.resolution < 4 or args.tasks < 1 or args.repeats < 1:
        parser.error("--resolution >= 4, --tasks >= 1 and --repeats >= 1")
    res = run(args)
    print(report(res), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
