"""Figures like the paper's: Figure 1 (the points GradNCP keeps at each step, the residual and
the reconstruction), Figure 5b (PSNR against test-time steps, beyond the training horizon) and
Figure 3b (test PSNR against meta-training time).

Run from the repository root::

    python -m examples.neural_fields.figures pruning --run runs/nf/text_gradncp --out fig1.png
    python -m examples.neural_fields.figures myopia --run runs/nf/text_maml \\
        --run runs/nf/text_gradncp --out fig5b.png

``myopia`` reads the ``eval_trained.json`` that ``evaluate`` writes in each run folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make `examples` and `ncp` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import ncp
from examples.neural_fields import signals as signals_mod


def pruning_steps(
    model: nn.Module, cfg: ncp.MetaConfig, x: Tensor, y: Tensor
) -> tuple[Tensor, List[Tensor]]:
    """Replay the meta-training inner loop on ``(x, y)`` one pruned step at a time.

    Returns:
        The kept indices ``(K, tasks, k)`` and the predictions ``(tasks, points, C)`` before each
        step and after the last (``K + 1`` of them).
    """
    if cfg.pruner is None:
        raise ValueError("`cfg` has no pruner: the pruning figure needs a GradNCP config.")
    params: Dict[str, Tensor] | None = None
    kept, preds = [], []
    with torch.no_grad():
        preds.append(torch.stack([model(xi) for xi in x]))
    for _ in range(cfg.inner_steps):
        step = ncp.adapt(model, x, y, cfg, steps=1, mode="pruned", params=params)
        assert step.kept_indices is not None
        kept.append(step.kept_indices[0])
        params = step.params
        with torch.no_grad():
            preds.append(ncp.forward(model, params, x))
    return torch.stack(kept), preds


def figure_pruning(
    path: str,
    model: nn.Module,
    cfg: ncp.MetaConfig,
    images: Tensor,
    *,
    show_steps: Sequence[int] | None = None,
) -> str:
    """Write the Figure 1 analogue as a PNG: one row per image; for each step in ``show_steps``
    the kept points (red) over the image and the residual ``|target - prediction|`` at that
    step (mean over channels, each panel scaled to its own maximum); then the reconstruction after ``K`` steps and the ground truth.

    Args:
        path: PNG to write.
        model: a meta-learned model.
        cfg: its GradNCP configuration.
        images: ``(N, H, W, C)`` in ``[0, 1]``.
        show_steps: inner steps shown (default first, middle, last).
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    if images.dim() != 4:
        raise ValueError(f"`images` must be (N, H, W, C), got {tuple(images.shape)}.")
    n, h, w, c = images.shape
    x, y = signals_mod.image_context(images)
    kept, preds = pruning_steps(model, cfg, x, y)
    K = kept.shape[0]
    steps = sorted(set(show_steps or (0, K // 2, K - 1)))
    bad = [k for k in steps if not 0 <= k < K]
    if bad:
        raise ValueError(f"`show_steps` must lie in [0, {K - 1}], got {bad}.")
    cols = 2 * len(steps) + 2
    fig = Figure(figsize=(1.6 * cols, 1.7 * n + 0.3), dpi=110, layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    for r in range(n):
        img = images[r].cpu()
        col = 0
        for k in steps:
            ax = axes[r, col]
            ax.imshow(img.numpy(), alpha=0.4, interpolation="nearest")
            idx = kept[k, r].cpu()
            size = (1.4 * 72 / w) ** 2 * 0.6  # about 60 % of a pixel's area, in points^2
            ax.scatter((idx % w).numpy(), (idx // w).numpy(), s=size, c="red", marker="s", lw=0)
            ax.set_title(f"kept at step {k + 1}", fontsize=7)
            residual = (preds[k][r] - y[r]).abs().mean(dim=-1).reshape(h, w).cpu()
            top = max(float(residual.max()), 1e-12)  # each panel on its own scale
            axes[r, col + 1].imshow(residual.numpy(), cmap="magma", vmin=0, vmax=top)
            axes[r, col + 1].set_title(f"|residual| at step {k + 1}\n(max {top:.2g})", fontsize=7)
            col += 2
        recon = preds[-1][r].clamp(0, 1).reshape(h, w, c).cpu()
        axes[r, col].imshow(recon.numpy(), interpolation="nearest")
        axes[r, col].set_title(f"after {K} steps", fontsize=7)
        axes[r, col + 1].imshow(img.numpy(), interpolation="nearest")
        axes[r, col + 1].set_title("ground truth", fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.savefig(path)
    return path


def figure_myopia(
    path: str,
    curves: Mapping[str, Mapping[int, float]],
    horizons: Mapping[str, int],
    *,
    title: str = "",
) -> str:
    """Write the Figure 5b analogue: test PSNR against test-time steps, one line per method,
    with a dotted line at each method's meta-training horizon ``K``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    for i, (name, curve) in enumerate(curves.items()):
        steps = sorted(curve)
        (line,) = ax.plot(steps, [curve[k] for k in steps], label=name, color=f"C{i}")
        if name in horizons:
            ax.axvline(horizons[name], color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("test-time steps (full context)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title or "PSNR beyond the training horizon (dotted: K)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return path


def _myopia_from_runs(runs: Sequence[str], out: str) -> str:
    curves: Dict[str, Dict[int, float]] = {}
    horizons: Dict[str, int] = {}
    for run in runs:
        file = os.path.join(run, "eval_trained.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} is missing; run `evaluate --run {run}` first.")
        with open(file) as f:
            res = json.load(f)
        for v in res["variants"].values():
            if len(v["curve"]) > 1:
                label = f"{res['method']} K={res['inner_steps']}" + (
                    " +rescale" if v["rescale"] else ""
                )
                curves[label] = {int(k): p for k, p in v["curve"].items()}
                horizons[label] = res["inner_steps"]
    return figure_myopia(out, curves, horizons, title=res["data"])


def time_to_quality(
    runs: Sequence[str],
) -> Tuple[Dict[str, List[Tuple[float, float]]], float, Dict[str, float | None]]:
    """Test PSNR against meta-training seconds of each run folder (paper Figure 3b).

    Reads each run's periodic evaluations (``metrics.jsonl`` records with ``train_seconds``:
    meta-training time only, evaluations and checkpoints excluded). Returns the curves
    ``{label: [(seconds, psnr), ...]}``, the target PSNR every run reaches (the lowest of the
    runs' best values) and, per run, the first time it reached the target.
    """
    from examples.neural_fields.train import read_log

    curves: Dict[str, List[Tuple[float, float]]] = {}
    for run in runs:
        log = read_log(run)
        start = next((r for r in log if r.get("event") == "start"), None)
        points = [
            (r["train_seconds"], r["psnr"])
            for r in log
            if r.get("event") == "eval" and "train_seconds" in r
        ]
        if start is None or not points:
            raise ValueError(
                f"{run} has no periodic evaluation with train_seconds; train it with this "
                "version of examples.neural_fields.train (and a small --eval-every)."
            )
        st = start["settings"]
        label = f"{st['method']} K={st['inner_steps']}" + (
            f" r={st['ratio']:g}" if st["method"] == "gradncp" else ""
        )
        curves[label] = points
    target = min(max(p for _, p in pts) for pts in curves.values())
    reached = {
        label: next((t for t, p in pts if p >= target), None) for label, pts in curves.items()
    }
    return curves, target, reached


def figure_time(path: str, runs: Sequence[str]) -> Tuple[str, str]:
    """Write the Figure 3b analogue (test PSNR against meta-training time) and return the path
    and a one-line summary of the time each run took to reach the common target PSNR."""
    from matplotlib.figure import Figure

    curves, target, reached = time_to_quality(runs)
    fig = Figure(figsize=(5, 3.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    for i, (label, pts) in enumerate(curves.items()):
        ax.plot([t for t, _ in pts], [p for _, p in pts], marker=".", label=label, color=f"C{i}")
        if reached[label] is not None:
            ax.axvline(reached[label], color=f"C{i}", ls=":", lw=1)
    ax.axhline(target, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("meta-training time (s, evaluations excluded)")
    ax.set_ylabel("test PSNR (dB)")
    ax.set_title(f"time to {target:.2f} dB (dotted)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path)
    summary = f"time to {target:.2f} dB: " + ", ".join(
        f"{label} {'-' if t is None else f'{t:.0f} s'}" for label, t in reached.items()
    )
    return path, summary


def main(argv: Sequence[str] | None = None) -> str:
    """Command line entry point; returns the path written."""
    from examples.neural_fields.evaluate import load_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figure", choices=("pruning", "myopia", "time"))
    parser.add_argument("--run", action="append", required=True, help="run folder (repeatable)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--signals", type=int, default=3, help="test images shown (3)")
    args = parser.parse_args(argv)
    if args.figure == "myopia":
        path = _myopia_from_runs(args.run, args.out)
    elif args.figure == "time":
        path, summary = figure_time(args.out, args.run)
        print(summary)
    else:
        r = load_run(args.run[0])
        if r["signals"].kind != "image":
            parser.error(f"the pruning figure needs an image run, got {r['signals'].kind}")
        path = figure_pruning(args.out, r["model"], r["config"], r["signals"].test[: args.signals])
    print(f"figure written to {path}")
    return path


if __name__ == "__main__":
    main()
