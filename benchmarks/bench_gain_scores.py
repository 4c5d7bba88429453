"""The cost of the paper's learning-progress scores against the GradNCP score (Fig. 3c, Sec. 2.2).

On one SIREN (5 x 256) and smooth random RGB images of ``M`` points, one scoring call per score:

* ``gradncp``: the closed-form last-layer gradient norm, one forward pass, ``O(M)``;
* ``spg``: the self-prediction gain of a last-layer SGD step, one forward pass, ``O(M)``;
* ``tpg``: the target-prediction gain, the ``M x M`` kernel of the head's inputs, ``O(M^2)``.

Prints the median seconds of ``--repeats`` calls after one warm-up call, and each score's time
over GradNCP's, measured in one run. With ``M`` growing 4x, an ``O(M)`` score's time grows about
4x and TPG's about 16x.

    python benchmarks/bench_gain_scores.py --points 256 1024 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import ncp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Siren, environment, header, image_batch

SCORES = ("gradncp", "spg", "tpg")


def seconds(pruner: ncp.ContextPruner, model, x, y, repeats: int) -> float:
    """Median seconds of one scoring call (the selector prepared once, as in a loop)."""
    select = pruner.prepare(model, x, y)
    params = ncp.functional.init_params(model, x.shape[0], detach=True)
    select.scores(params, x, y)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        select.scores(params, x, y)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=1024, help="TPG points per pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(header("bench_gain_scores: GradNCP vs SPG vs TPG scoring", environment("cpu")))
    torch.manual_seed(0)
    model = Siren()
    print(
        f"\n{'points':>8} "
        + " ".join(f"{s + ' s':>10}" for s in SCORES)
        + "  spg/gradncp  tpg/gradncp"
    )
    for m in args.points:
        side = round(m**0.5)
        x, y = image_batch(side, 1)
        times = {
            s: seconds(
                ncp.ContextPruner(score=s, chunk_size=args.chunk_size), model, x, y, args.repeats
            )
            for s in SCORES
        }
        base = times["gradncp"]
        print(
            f"{side * side:>8} "
            + " ".join(f"{times[s]:>10.4f}" for s in SCORES)
            + f"  {times['spg'] / base:>11.2f}  {times['tpg'] / base:>11.2f}"
        )


if __name__ == "__main__":
    main()
