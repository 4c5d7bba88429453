"""How much larger is a step on the top-scored rays than a step on all rays of the view?

The NeRF counterpart of ``examples.neural_fields.gradnorm``: along a pruned adaptation of a
meta-learned NeRF on the context view of its test scenes, at the run's inner lr, the ratio
``||grad of the mean loss on the kept rays|| / ||grad of the mean loss on all rays||`` at every
step, averaged over scenes. GradNCP's inner steps during meta-training are this many times a
full-context step; a mean over the top ``ratio`` of rays can be up to ``1 / ratio`` times it.

Run from the repository root on a folder written by ``examples.nerf.train``::

    python -m examples.nerf.gradnorm --run runs/nerf/gradncp_s0 --ratios 0.25 0.5
"""

from __future__ import annotations

import argparse
from typing import List, Sequence

from ..neural_fields.gradnorm import check_arguments, ratio_lines
from .train import load_run, splits


def main(argv: Sequence[str] | None = None) -> List[str]:
    """Command line entry point; returns the printed lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="folder written by examples.nerf.train")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--inner-steps", type=int, default=16, help="inner steps (16)")
    parser.add_argument("--scenes", type=int, default=8, help="test scenes (8)")
    args = parser.parse_args(argv)
    check_arguments(parser, args, "inner_steps", "scenes")
    model, s = load_run(args.run)
    test = splits(s)["test"]
    n = min(args.scenes, test.scenes)
    x, y = test.rays[:n, 0], test.colours[:n, 0]
    lines = [
        f"{args.run}: pruned / full gradient norm at inner lr {s['inner_lr']:g}, mean over "
        f"{n} test scenes' context views, per step"
    ]
    lines += ratio_lines(model, x, y, args.ratios, args.inner_steps, s["inner_lr"])
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
