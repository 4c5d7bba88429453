"""Score quality over adaptation and over meta-training (paper Fig. 4, Fig. 9 and Fig. 10).

The GradNCP score ranks a point by its loss gradient with respect to the last layer only. The
paper supports it with the Pearson correlation between that score and the exact gradient norm
over the whole network, per signal, which it finds higher after meta-learning and rising over
the inner steps (Fig. 4, Fig. 9), and with the profile of the score along the points sorted by
loss, with the kept points marked (Fig. 10). This tool measures both on the run folders of
``train``:

- ``training``: the correlation on test signals after ``--inner-steps`` steps of adaptation,
  at every snapshot of each run (train with ``--snapshot-every``; the snapshot at step 0 is the
  random initialisation), written to ``OUT/score_quality.json``, ``OUT/score_quality.md`` (a
  table over seeds), ``OUT/score_quality.png`` (correlation against outer step) and
  ``OUT/score_quality_steps.png`` (against inner steps, first and last snapshot).
- ``ranks``: for one test signal of one run, the score of every point in the order of its loss,
  the kept points marked, after each of ``--inner-steps`` pruned steps, and the share of the
  kept points that are also among the highest losses, written to a PNG and a JSON beside it.
- ``dtype``: after pruned steps, how far bfloat16 scores (``ContextPruner(score_dtype=...)``)
  depart from the run's own, and how many kept points the two choose alike (printed).

Run from the repository root::

    python -m examples.neural_fields.score_quality training \\
        --run runs/nf_repro/text_quality_maml_s0 --run runs/nf_repro/text_quality_gradncp_s0 \\
        --out runs/nf_repro/score_quality
    python -m examples.neural_fields.score_quality ranks --run runs/nf_repro/text_gradncp_s0 \\
        --out fig10.png
    python -m examples.neural_fields.score_quality dtype --run runs/nf_repro/text_gradncp_s0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from typing import Any, Dict, List, Literal, Sequence

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make `examples` and `ncp` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import ncp
from ncp.diagnostics import score_correlation

MODES = ("full", "pruned")


def _params_after(
    model: nn.Module,
    cfg: ncp.MetaConfig,
    x: Tensor,
    y: Tensor,
    k: int,
    *,
    mode: str,
    learned_lr: ncp.LearnedLR | None = None,
) -> Dict[str, Tensor]:
    """Per-task parameters after ``k`` adaptation steps in ``mode`` (the initialisation for 0)."""
    if k == 0:
        return ncp.functional.init_params(model, x.shape[0], detach=True)
    how: Literal["full", "pruned"] = "pruned" if mode == "pruned" else "full"
    return ncp.adapt(model, x, y, cfg, steps=k, mode=how, learned_lr=learned_lr).params


def correlation_by_step(
    model: nn.Module,
    cfg: ncp.MetaConfig,
    x: Tensor,
    y: Tensor,
    steps: Sequence[int],
    *,
    mode: str = "full",
    learned_lr: ncp.LearnedLR | None = None,
    chunk_size: int = 256,
) -> Dict[int, Tensor]:
    """Per task, the correlation between the GradNCP score and the whole network's gradient
    norm on the full context ``(x, y)``, after each step count in ``steps``.

    Each count is adapted from the initialisation (so learned rates start their schedule at
    their first step), with :func:`ncp.adapt` in ``mode``: ``"full"`` (test-time adaptation,
    Algorithm 2) or ``"pruned"`` (the meta-training inner loop; ``cfg`` needs a pruner).

    Returns:
        ``{k: (tasks,)}``.
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    if mode == "pruned" and cfg.pruner is None:
        raise ValueError("`mode`='pruned' needs `cfg.pruner`; give a MAML run one first.")
    bad = [k for k in steps if int(k) != k or k < 0]
    if bad or not steps:
        raise ValueError(f"`steps` must be step counts >= 0, got {list(steps)}.")
    out = {}
    for k in sorted(set(int(k) for k in steps)):
        params = _params_after(model, cfg, x, y, k, mode=mode, learned_lr=learned_lr)
        out[k] = score_correlation(
            model, params, x, y, loss_fn=cfg.loss_fn, chunk_size=chunk_size
        ).cpu()
    return out


def _load(
    run: str, device: str, test: slice, at_step: int | None = None
) -> tuple[Dict[str, Any], ncp.MetaConfig, Tensor, Tensor]:
    """``load_run`` of ``run`` (its snapshot at ``at_step``), its config with a pruner (MAML
    gets the data set's paper ratio) and the context of the test signals ``test``."""
    from examples.neural_fields import train
    from examples.neural_fields.evaluate import load_run, rescale_config

    r = load_run(run, device=device, at_step=at_step)
    cfg = rescale_config(r["config"], train.paper_ratio(r["settings"]["data"]))
    x, y = r["signals"].context(r["signals"].test[test].to(device))
    return r, cfg, x, y


def _label(settings: Dict[str, Any]) -> str:
    label = f"{settings['method']} K={settings['inner_steps']}"
    if settings["method"] == "gradncp":
        label += f" r={settings['ratio']:g}"
    return label


def over_training(
    run: str,
    *,
    steps: Sequence[int] = (0, 16),
    signals: int = 8,
    mode: str = "full",
    at: Sequence[int] | None = None,
    device: str = "cpu",
    chunk_size: int = 256,
) -> Dict[str, Any]:
    """The score correlation of every snapshot of ``run`` (or of those taken at the outer steps
    ``at``), :func:`correlation_by_step` on its first ``signals`` test signals.

    Returns:
        ``run``, ``label``, ``method``, ``seed``, ``mode``, ``signals`` and ``points``: one
        record ``{"outer_step", "k", "r": [per signal], "mean"}`` per snapshot and step count.
    """
    from examples.neural_fields import train

    taken = train.snapshot_steps(run)
    if not taken:
        raise ValueError(
            f"`run`={run!r} has no snapshots: train it with --snapshot-every N (this tool reads "
            f"{train.SNAPSHOTS}/ in the run folder)."
        )
    if at is not None:
        missing = sorted(set(at) - set(taken))
        if missing:
            raise ValueError(f"`at`: {run} has no snapshots at steps {missing}; it has {taken}.")
        taken = sorted(set(at))
    if signals < 1:
        raise ValueError(f"`signals` must be >= 1, got {signals}.")
    points: List[Dict[str, Any]] = []
    settings: Dict[str, Any] = {}
    for outer in taken:
        r, cfg, x, y = _load(run, device, slice(signals), at_step=outer)
        settings = r["settings"]
        found = correlation_by_step(
            r["model"],
            cfg,
            x,
            y,
            steps,
            mode=mode,
            learned_lr=r["learned_lr"],
            chunk_size=chunk_size,
        )
        for k, rs in found.items():
            values = [float(v) for v in rs]
            points.append(
                {"outer_step": outer, "k": k, "r": values, "mean": statistics.fmean(values)}
            )
    return {
        "run": run,
        "label": _label(settings),
        "method": settings["method"],
        "seed": settings["seed"],
        "mode": mode,
        "signals": signals,
        "points": points,
    }


def _by_label(results: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for res in results:
        groups.setdefault(res["label"], []).append(res)
    return groups


def _series(res: Dict[str, Any], k: int) -> Dict[int, float]:
    return {p["outer_step"]: p["mean"] for p in res["points"] if p["k"] == k}


def summary_table(results: Sequence[Dict[str, Any]]) -> str:
    """A Markdown table: per method and step count, the correlation at the first snapshot (the
    random initialisation when it is step 0) and at the last, mean ± 95 % CI over the runs
    (seeds), and their paired change."""
    from examples.neural_fields.reproduce import cell

    lines = [
        "| method | k (inner steps) | first snapshot | last snapshot | last - first | seeds |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, runs in _by_label(results).items():
        ks = sorted({p["k"] for res in runs for p in res["points"]})
        for k in ks:
            series = [_series(res, k) for res in runs]
            first = [s[min(s)] for s in series]
            last = [s[max(s)] for s in series]
            span = f"steps {min(series[0])}-{max(series[0])}"
            lines.append(
                f"| {label} ({span}) | {k} | {cell(first, 3)} | {cell(last, 3)} | "
                f"{cell([b - a for a, b in zip(first, last, strict=True)], 3)} | {len(runs)} |"
            )
    ks = sorted({p["k"] for res in results for p in res["points"]})
    if len(ks) > 1:  # Fig. 9's question: does adaptation raise the correlation?
        lo, hi = ks[0], ks[-1]
        lines += [
            "",
            f"| method | r after {hi} steps - r after {lo}: first snapshot | last snapshot | seeds |",
            "| --- | ---: | ---: | ---: |",
        ]
        for label, runs in _by_label(results).items():
            gains: List[List[float]] = [[], []]  # first snapshot, last
            for res in runs:
                a, b = _series(res, lo), _series(res, hi)
                gains[0].append(b[min(b)] - a[min(a)])
                gains[1].append(b[max(b)] - a[max(a)])
            lines.append(f"| {label} | {cell(gains[0], 3)} | {cell(gains[1], 3)} | {len(runs)} |")
    return "\n".join(lines)


def figure_steps(path: str, results: Sequence[Dict[str, Any]]) -> str:
    """Write the Fig. 9 analogue: the correlation against the number of inner steps at the first
    snapshot (dashed; the random initialisation when it is step 0) and the last (solid) of each
    method, mean over its runs."""
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("`results` is empty: there is no run to plot.")
    fig = Figure(figsize=(4.6, 3.3), dpi=110, layout="constrained")
    ax = fig.subplots()
    drawn: Dict[tuple, Any] = {}  # runs from the same initialisation share their first curve
    for i, (label, runs) in enumerate(_by_label(results).items()):
        for which, style in ((min, "--"), (max, "-")):
            outer = [which(p["outer_step"] for p in res["points"]) for res in runs]
            curve: Dict[int, List[float]] = {}
            for res, t in zip(runs, outer, strict=True):
                for p in res["points"]:
                    if p["outer_step"] == t:
                        curve.setdefault(p["k"], []).append(p["mean"])
            ks = sorted(curve)
            ys = tuple(round(statistics.fmean(curve[k]), 12) for k in ks)
            name = f"{label}, outer step {outer[0]}"
            if (tuple(ks), ys) in drawn:
                line = drawn[(tuple(ks), ys)]
                line.set_label(f"{line.get_label()}\n= {name}")
                line.set_color("0.35")
                continue
            (line,) = ax.plot(ks, ys, style, color=f"C{i}", marker=".", label=name)
            drawn[(tuple(ks), ys)] = line
    ax.set_xlabel("inner steps of adaptation")
    ax.set_ylabel("Pearson r, score vs full gradient norm")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return path


def figure_training(path: str, results: Sequence[Dict[str, Any]]) -> str:
    """Write the correlation against outer step: one panel per step count, one colour per
    method, a thin line per run (seed) and a thick line for their mean."""
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("`results` is empty: there is no run to plot.")
    ks = sorted({p["k"] for res in results for p in res["points"]})
    fig = Figure(figsize=(3.3 * len(ks), 3.2), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(ks), squeeze=False)[0]
    for ax, k in zip(axes, ks, strict=True):
        for i, (label, runs) in enumerate(_by_label(results).items()):
            series = [_series(res, k) for res in runs]
            for s in series:
                ax.plot(list(s), list(s.values()), color=f"C{i}", lw=0.6, alpha=0.4)
            common = sorted(set.intersection(*(set(s) for s in series)))
            mean = [statistics.fmean(s[t] for s in series) for t in common]
            ax.plot(common, mean, color=f"C{i}", lw=1.8, marker=".", label=f"{label} ({len(runs)})")
        ax.set_title(f"after {k} inner step{'s' if k != 1 else ''}", fontsize=9)
        ax.set_xlabel("outer step (0: random initialisation)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Pearson r, score vs full gradient norm")
    axes[0].legend(fontsize=7)
    fig.savefig(path)
    return path


def rank_profile(
    model: nn.Module,
    cfg: ncp.MetaConfig,
    x: Tensor,
    y: Tensor,
    steps: Sequence[int],
    *,
    learned_lr: ncp.LearnedLR | None = None,
) -> Dict[int, Dict[str, Tensor]]:
    """For one signal ``(1, points, ...)``, after each count in ``steps`` of pruned steps (the
    meta-training inner loop): the per-point ``loss`` and ``score``, the ``kept`` mask of the
    pruner at those parameters, and ``overlap``, the share of the kept points that are also
    among the same number of highest losses (paper Fig. 10)."""
    if cfg.pruner is None:
        raise ValueError("`cfg` has no pruner: the rank profile needs one (rescale_config).")
    if x.shape[0] != 1:
        raise ValueError(f"`x` must hold one signal (1, points, ...), got {tuple(x.shape)}.")
    n = x.shape[1]
    out = {}
    for k in sorted(set(int(k) for k in steps)):
        params = _params_after(model, cfg, x, y, k, mode="pruned", learned_lr=learned_lr)
        with torch.no_grad():
            loss = cfg.loss_fn(ncp.forward(model, params, x), y)[0]
        score = cfg.pruner.scores(model, x, y, params=params, loss_fn=cfg.loss_fn)[0]
        chosen = cfg.pruner(model, x, y, params=params, loss_fn=cfg.loss_fn).indices[0]
        keep = chosen.numel()
        kept = torch.zeros(n, dtype=torch.bool, device=x.device)
        kept[chosen] = True
        by_loss = torch.zeros_like(kept)
        by_loss[loss.topk(keep).indices] = True
        overlap = (kept & by_loss).sum() / keep
        out[k] = {
            "loss": loss.cpu(),
            "score": score.cpu(),
            "kept": kept.cpu(),
            "overlap": overlap.cpu(),
        }
    return out


def figure_ranks(path: str, profile: Dict[int, Dict[str, Tensor]], title: str = "") -> str:
    """Write the Fig. 10 analogue: per step, each point's score against its rank by loss
    (highest loss first), the points the pruner keeps in red."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(profile), 3.0), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(profile), squeeze=False)[0]
    for ax, (k, p) in zip(axes, profile.items(), strict=True):
        order = p["loss"].argsort(descending=True)
        score, kept = p["score"][order].double(), p["kept"][order]
        rank = torch.arange(1, len(order) + 1)
        ax.scatter(
            rank[~kept].numpy(), score[~kept].numpy(), s=2, c="0.6", lw=0, label="pruned away"
        )
        ax.scatter(rank[kept].numpy(), score[kept].numpy(), s=2, c="red", lw=0, label="kept")
        ax.set_yscale("log")
        ax.set_xlabel("rank by loss (1: highest)")
        ax.set_title(f"step {k}: {float(p['overlap']):.0%} of kept in top losses", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GradNCP score (last-layer gradient norm)")
    axes[0].legend(fontsize=7, markerscale=4)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path)
    return path


def dtype_agreement(
    model: nn.Module,
    cfg: ncp.MetaConfig,
    x: Tensor,
    y: Tensor,
    steps: Sequence[int],
    dtype: torch.dtype | None,
) -> Dict[int, Dict[str, float]]:
    """How far scoring in ``dtype`` (``ContextPruner(score_dtype=dtype)``; None: the inputs'
    dtype) departs from ``cfg.pruner``'s own scores after each count in ``steps`` of pruned
    steps taken with ``cfg``: ``rel_err``, the mean of ``|s - s_dtype| / |s|`` over points,
    and ``overlap``, the mean share of the kept points the two choose alike."""
    if cfg.pruner is None:
        raise ValueError("`cfg` has no pruner: give a MAML run one first (rescale_config).")
    other = dataclasses.replace(cfg.pruner, score_dtype=dtype)
    out = {}
    for k in sorted(set(int(k) for k in steps)):
        params = _params_after(model, cfg, x, y, k, mode="pruned")
        a = cfg.pruner.scores(model, x, y, params=params, loss_fn=cfg.loss_fn)
        b = other.scores(model, x, y, params=params, loss_fn=cfg.loss_fn)
        keep = cfg.pruner.keep(x.shape[1])
        ia, ib = a.topk(keep, dim=1).indices, b.topk(keep, dim=1).indices
        shared = [
            len(set(u.tolist()) & set(v.tolist())) / keep for u, v in zip(ia, ib, strict=True)
        ]
        rel = ((a - b.to(a.dtype)).abs() / a.abs().clamp_min(torch.finfo(a.dtype).tiny)).mean()
        out[k] = {"rel_err": float(rel), "overlap": statistics.fmean(shared)}
    return out


def _dtype(args: argparse.Namespace) -> str:
    lines = []
    for run in args.run:
        r, cfg, x, y = _load(run, args.device, slice(args.signals))
        steps = args.inner_steps or [0, cfg.inner_steps // 2, cfg.inner_steps]
        found = dtype_agreement(r["model"], cfg, x, y, steps, torch.bfloat16)
        for k, v in found.items():
            lines.append(
                f"{run}: after {k} pruned steps, bfloat16 scores differ from the run's by "
                f"{v['rel_err']:.1%} on average; kept sets share {v['overlap']:.1%}"
            )
    print("\n".join(lines))
    return "\n".join(lines)


def _ranks(args: argparse.Namespace) -> str:
    if len(args.run) != 1:
        raise ValueError(f"ranks takes one --run, got {len(args.run)}")
    r, cfg, x, y = _load(args.run[0], args.device, slice(args.signal, args.signal + 1))
    n_test = r["signals"].test.shape[0]
    if not 0 <= args.signal < n_test:
        raise ValueError(f"--signal must be in [0, {n_test - 1}], got {args.signal}")
    steps = args.inner_steps or [0, cfg.inner_steps // 2, cfg.inner_steps]
    profile = rank_profile(r["model"], cfg, x, y, steps, learned_lr=r["learned_lr"])
    title = f"{_label(r['settings'])}, {r['settings']['data']} test signal {args.signal}"
    path = figure_ranks(args.out, profile, title)
    summary = {
        "run": args.run[0],
        "signal": args.signal,
        "kept": profile[min(profile)]["kept"].sum().item(),
        "points": x.shape[1],
        "overlap": {str(k): float(p["overlap"]) for k, p in profile.items()},
    }
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    print(
        "kept points among the highest losses: "
        + ", ".join(f"step {k} {v:.0%}" for k, v in summary["overlap"].items())
    )
    return path


def _training(args: argparse.Namespace) -> str:
    steps = args.inner_steps or [0, 16]
    results = [
        over_training(
            run,
            steps=steps,
            signals=args.signals,
            mode=args.mode,
            at=args.at,
            device=args.device,
            chunk_size=args.chunk_size,
        )
        for run in args.run
    ]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "score_quality.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = summary_table(results)
    with open(os.path.join(args.out, "score_quality.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    figure_steps(os.path.join(args.out, "score_quality_steps.png"), results)
    return figure_training(os.path.join(args.out, "score_quality.png"), results)


def main(argv: Sequence[str] | None = None) -> str:
    """Command line entry point; returns the figure written (``dtype``: the lines printed)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=("training", "ranks", "dtype"))
    parser.add_argument("--run", action="append", required=True, help="run folder (repeatable)")
    parser.add_argument("--out", help="training: a folder; ranks: a PNG (both need it)")
    parser.add_argument(
        "--inner-steps",
        type=int,
        nargs="+",
        help="step counts to measure at (training: 0 16; ranks, dtype: 0, K/2, K)",
    )
    parser.add_argument(
        "--at", type=int, nargs="+", help="training: the snapshots' outer steps to use (all)"
    )
    parser.add_argument("--signals", type=int, default=8, help="training, dtype: test signals (8)")
    parser.add_argument("--signal", type=int, default=0, help="ranks: which test signal (0)")
    parser.add_argument(
        "--mode", choices=MODES, default="full", help="training: how to adapt (full)"
    )
    parser.add_argument("--chunk-size", type=int, default=256, help="points per exact pass (256)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (torch's default)")
    args = parser.parse_args(argv)
    if args.study != "dtype" and args.out is None:
        parser.error(f"{args.study} needs --out")
    if args.inner_steps is not None and min(args.inner_steps) < 0:
        parser.error(f"--inner-steps must be >= 0, got {args.inner_steps}")
    for name in ("signals", "chunk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.study == "dtype":
            return _dtype(args)
        path = _ranks(args) if args.study == "ranks" else _training(args)
    except ValueError as e:  # a run without snapshots or a pruner: say so, no traceback
        parser.error(str(e))
    print(f"figure written to {path}")
    return path


if __name__ == "__main__":
    main()
