"""Renders of meta-learned NeRFs side by side: the context view, then each unseen view's ground
truth and every run's render after adapting on the context view.

Run from the repository root on folders written by ``examples.nerf.train``::

    python -m examples.nerf.figure --run runs/nerf/maml_s0 --run runs/nerf/gradncp_s0 \\
        --out docs/reproduction/nerf_views.png
"""

from __future__ import annotations

import argparse
import os
from typing import List, Sequence

import torch

import ncp

from .train import load_run, splits, test_config


def renders(run: str, scenes: Sequence[int], mode: str = "full") -> tuple[torch.Tensor, ...]:
    """The test ``scenes`` of ``run``: ground truth ``(scenes, views, H, W, 3)`` and the run's
    renders of the same views after adapting on view 0 (``mode`` as in :func:`ncp.adapt`)."""
    model, s = load_run(run)
    test = splits(s)["test"]
    if max(scenes) >= test.scenes:
        raise ValueError(f"`--scenes` must be below {test.scenes} (the test scenes), got {scenes}.")
    cfg = test_config(s)
    idx = list(scenes)
    rays, colours = test.rays[idx], test.colours[idx]
    params = ncp.adapt(model, rays[:, 0], colours[:, 0], cfg, mode=mode).params
    with torch.no_grad():
        pred = torch.stack([ncp.forward(model, params, rays[:, v]) for v in range(test.views)], 1)
    side = test.resolution
    shape = (len(idx), test.views, side, side, 3)
    return colours.reshape(shape), pred.clamp(0, 1).reshape(shape)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, help="run folder (repeatable)")
    p.add_argument("--scenes", type=int, nargs="+", default=[0, 1, 2], help="test scenes shown")
    p.add_argument("--out", default=os.path.join("runs", "nerf", "views.png"))
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth, _ = renders(args.run[0], args.scenes)
    rows: List[tuple[str, torch.Tensor]] = [("ground truth", truth)]
    for run in args.run:
        rows.append((os.path.basename(os.path.normpath(run)), renders(run, args.scenes)[1]))
    n_scenes, views = truth.shape[:2]
    fig, axes = plt.subplots(
        len(rows) * n_scenes, views, figsize=(1.4 * views, 1.4 * len(rows) * n_scenes)
    )
    for i in range(n_scenes):
        for r, (label, images) in enumerate(rows):
            for v in range(views):
                ax = axes[i * len(rows) + r, v]
                ax.imshow(images[i, v].numpy())
                ax.set_xticks([])
                ax.set_yticks([])
                if v == 0:
                    ax.set_ylabel(f"{label}\nscene {args.scenes[i]}", fontsize=6)
                if i == 0 and r == 0:
                    ax.set_title("context view" if v == 0 else f"unseen view {v}", fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
