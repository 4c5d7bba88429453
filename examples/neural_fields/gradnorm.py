"""How much larger is a step on the pruned context than a step on the full context?

Along a pruned adaptation (``ncp.adapt(..., mode="pruned")``), this measures, at every inner step
and for each test signal, the ratio ``||grad of the mean loss on the kept points|| / ||grad of
the mean loss on all points||``. A mean over the top ``ratio`` of points can be up to
``1 / ratio`` times the full-context gradient; this is the factor by which meta-training's inner
steps are larger than full-context steps (paper Figure 8), and what test-time rescaling undoes.

Run from the repository root on a folder written by ``train``::

    python -m examples.neural_fields.gradnorm --run runs/nf_repro/climate_gradncp_s0 --ratios 0.25 0.5
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Sequence

import torch
from torch.func import functional_call

if __package__ in (None, ""):  # run as a script: make `examples` and `ncp` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import ncp
from examples.neural_fields import evaluate


def _norm(loss: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(params.values()))
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads))


def grad_ratios(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ratio: float,
    steps: int,
    inner_lr: float = 1e-2,
) -> torch.Tensor:
    """``(steps, tasks)``: pruned over full gradient norm of the MSE at each step of a pruned
    adaptation with ``ContextPruner(ratio)`` at ``inner_lr`` (the neural-field default, 1e-2)."""
    cfg = ncp.MetaConfig(
        inner_steps=steps,
        inner_lr=inner_lr,
        pruner=ncp.ContextPruner(ratio=ratio),
        bootstrap=None,
    )
    current = {n: p.detach().expand(x.shape[0], *p.shape) for n, p in model.named_parameters()}
    out = []
    for _ in range(steps):
        adapted = ncp.adapt(model, x, y, cfg, steps=1, mode="pruned", params=current)
        kept = adapted.kept_indices[0]  # chosen from `current`, before the step
        row = []
        for t in range(x.shape[0]):
            p = {n: v[t].clone().requires_grad_(True) for n, v in current.items()}
            full = ((functional_call(model, p, (x[t],)) - y[t]) ** 2).mean()
            xs, ys = x[t, kept[t]], y[t, kept[t]]
            pruned = ((functional_call(model, p, (xs,)) - ys) ** 2).mean()
            row.append((_norm(pruned, p) / _norm(full, p)).item())
        out.append(row)
        current = adapted.params
    return torch.tensor(out)


def check_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *counts: str
) -> None:
    """Exit through ``parser.error`` unless every ``counts`` flag is >= 1 and every ratio is in
    (0, 1]."""
    for name in counts:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for r in args.ratios:
        if not 0 < r <= 1:
            parser.error(f"--ratios must be in (0, 1], got {r}")


def ratio_lines(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ratios: Sequence[float],
    steps: int,
    inner_lr: float = 1e-2,
) -> List[str]:
    """One line per ratio: :func:`grad_ratios` averaged over tasks at each step, and its max."""
    lines = []
    for ratio in ratios:
        per_step = grad_ratios(model, x, y, ratio, steps, inner_lr).mean(1)
        values = " ".join(f"{v:.2f}" for v in per_step.tolist())
        lines.append(
            f"ratio {ratio:g} (at most {1 / ratio:g}): {values} | max {per_step.max():.2f}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> List[str]:
    """Command line entry point; returns the printed lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="folder written by train")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--inner-steps", type=int, default=16, help="inner steps (16)")
    parser.add_argument("--signals", type=int, default=8, help="test signals (8)")
    parser.add_argument("--init", choices=("trained", "random"), default="trained")
    args = parser.parse_args(argv)
    check_arguments(parser, args, "inner_steps", "signals")
    run = evaluate.load_run(args.run, init=args.init)
    signals = run["signals"]
    x, y = signals.context(signals.test[: args.signals])
    lines = [f"{args.run} ({args.init}): pruned / full gradient norm, mean over signals, per step"]
    lines += ratio_lines(run["model"], x, y, args.ratios, args.inner_steps)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
