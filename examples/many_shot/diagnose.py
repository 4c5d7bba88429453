"""Measurements behind the many-shot findings, on one trained run: batch-norm statistics of the
kept points against the full support set, and the chunked bootstrap against the unchunked one.

Run from the repository root on a finished run folder::

    python -m examples.many_shot.diagnose --run runs/many_shot/v2/glyphs-5w100s/gradncp-s0 \\
        --episodes 20 --out runs/many_shot/v2/diagnose-glyphs.json

1. **Batch norm.** The score of a point is computed in a forward pass over the whole support set,
   so with batch statistics it is normalised with the full set's mean and variance; the inner
   step that follows runs a forward pass over the kept points only, normalised with *their*
   statistics. For each batch-norm layer it reports the gap between the two, per channel: the
   shift of the mean in units of the full set's standard deviation and ``|log(var_kept /
   var_full)|``. It also reports the cosine between the step the score assumed (the gradient of
   the kept points' loss under full-support statistics) and the step taken (under the kept
   points' statistics). Kept sets: global top-k, class-balanced top-k, and a random subset of
   the same size as a reference. At the meta-learned initialisation and after the run's pruned
   adaptation.
2. **Chunked bootstrap.** The bootstrap target from ``theta_K`` computed on the whole support
   set at once and in chunks of ``--bootstrap-chunk`` points (batch norm then normalises each chunk
   with its own statistics, like ghost batch norm): the cosine between the two target updates
   ``theta_boot - theta_K`` and the ratio of their norms, with the support in the sampler's
   order (sorted by label: a chunk holds one or two classes) and shuffled as training does
   (:func:`examples.many_shot.episodes.shuffle_support`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

import ncp
from ncp.functional import balanced_top_k_indices, top_k_indices

from .. import harness
from .episodes import EpisodeSampler, shuffle_support
from .model import build_model
from .train import RunConfig, bootstrap, eval_config, learned_lr, load_splits

SUBSETS = ("global", "balanced", "random")


def load_run(run_dir: Path) -> tuple[RunConfig, nn.Module, ncp.LearnedLR | None]:
    """The configuration, model and learned rates of a run folder's last checkpoint."""
    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt} not found; pass the folder of a trained run.")
    state = harness.load_checkpoint(ckpt, "cpu")
    cfg = RunConfig(**{**state["settings"], "device": "cpu", "out": str(run_dir)})
    model = build_model(cfg.ways, cfg.channels, cfg.hidden, cfg.image_size, cfg.norm, cfg.seed)
    model.load_state_dict(state["model"])
    rates = learned_lr(cfg, model)
    if rates is not None:
        rates.load_state_dict(state["learned_lr"])
    return cfg, model, rates


def bn_inputs(model: nn.Module, params: Dict[str, Tensor], x: Tensor) -> List[Tensor]:
    """The inputs ``(points, C, H, W)`` of every batch-norm layer in one forward pass of one
    task with ``params``."""
    seen: List[Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    try:
        with torch.no_grad():
            functional_call(model, params, (x,))
    finally:
        for h in hooks:
            h.remove()
    return seen


def stat_gap(full: Tensor, kept: Tensor) -> Dict[str, float]:
    """Per-channel gap between the batch statistics of ``kept`` and ``full`` (both
    ``(points, C, H, W)``), averaged over channels."""
    mu_f, var_f = full.mean((0, 2, 3)), full.var((0, 2, 3), unbiased=False)
    mu_k, var_k = kept.mean((0, 2, 3)), kept.var((0, 2, 3), unbiased=False)
    eps = 1e-5
    return {
        "mean_shift": ((mu_k - mu_f).abs() / (var_f + eps).sqrt()).mean().item(),
        "log_var_ratio": ((var_k + eps) / (var_f + eps)).log().abs().mean().item(),
    }


def step_cosine(
    model: nn.Module, params: Dict[str, Tensor], x: Tensor, y: Tensor, idx: Tensor
) -> float:
    """Cosine between the gradient of the kept points' cross-entropy under full-support batch
    statistics (what the score assumed) and under the kept points' own statistics (the step)."""
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    full_logits = functional_call(model, leaves, (x,))
    assumed = torch.autograd.grad(
        nn.functional.cross_entropy(full_logits[idx], y[idx]), list(leaves.values())
    )
    taken = torch.autograd.grad(
        nn.functional.cross_entropy(functional_call(model, leaves, (x[idx],)), y[idx]),
        list(leaves.values()),
    )
    a = torch.cat([g.flatten() for g in assumed])
    b = torch.cat([g.flatten() for g in taken])
    return nn.functional.cosine_similarity(a, b, dim=0).item()


def kept_sets(
    cfg: RunConfig,
    model: nn.Module,
    params: Dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    gen: torch.Generator,
) -> Dict[str, Tensor]:
    """Kept indices ``(tasks, k)`` of each subset rule at ``params``."""
    pruner = ncp.ContextPruner(ratio=cfg.ratio, score=cfg.score)
    scores = pruner.scores(model, x, y, params=params, loss_fn=ncp.losses.cross_entropy)
    k = pruner.keep(x.shape[1])
    rand = torch.stack([torch.randperm(x.shape[1], generator=gen)[:k] for _ in range(x.shape[0])])
    return {
        "global": top_k_indices(scores, k),
        "balanced": balanced_top_k_indices(scores, y, k, cfg.ways),
        "random": rand,
    }


def batch_norm_gaps(
    cfg: RunConfig, model: nn.Module, rates: ncp.LearnedLR | None, episodes: int, split: str
) -> Dict[str, Any]:
    """Statistic gaps and step cosines per subset rule, at the initialisation and after the
    run's own pruned adaptation (``cfg.test_horizon`` steps)."""
    splits = load_splits(cfg)
    sampler = EpisodeSampler(splits[split], cfg.ways, cfg.shots, cfg.queries, seed=cfg.eval_seed)
    ep = sampler.sample(episodes)
    x, y = ep.support_x, ep.support_y
    gen = torch.Generator().manual_seed(0)
    lr_kw: Dict[str, Any] = {"lr": cfg.inner_lr} if rates is None else {"learned_lr": rates}
    adapted = ncp.adapt(
        model,
        x,
        y,
        eval_config(cfg),
        steps=cfg.test_horizon,
        mode="pruned",
        loss_fn=ncp.losses.cross_entropy,
        **lr_kw,
    )
    points = {
        "init": ncp.functional.init_params(model, episodes, detach=True),
        "adapted": adapted.params,
    }
    out: Dict[str, Any] = {}
    for where, params in points.items():
        sets = kept_sets(cfg, model, params, x, y, gen)
        rows: Dict[str, Dict[str, List[float]]] = {s: {} for s in SUBSETS}
        for t in range(episodes):
            p_t = {k: v[t] for k, v in params.items()}
            full = bn_inputs(model, p_t, x[t])
            for name, idx in sets.items():
                kept = bn_inputs(model, p_t, x[t][idx[t]])
                for layer, (f, kk) in enumerate(zip(full, kept, strict=True)):
                    for key, v in stat_gap(f, kk).items():
                        rows[name].setdefault(f"{key}_layer{layer + 1}", []).append(v)
                rows[name].setdefault("step_cosine", []).append(
                    step_cosine(model, p_t, x[t], y[t], idx[t])
                )
        out[where] = {
            name: {key: float(np.mean(v)) for key, v in r.items()} for name, r in rows.items()
        }
    return out


def bootstrap_chunking(
    cfg: RunConfig,
    model: nn.Module,
    rates: ncp.LearnedLR | None,
    episodes: int,
    split: str,
    chunk: int,
) -> Dict[str, Any]:
    """Cosine and norm ratio between the chunked and unchunked bootstrap target updates, from
    ``theta_K`` of the run's pruned adaptation, per task."""
    splits = load_splits(cfg)
    sampler = EpisodeSampler(splits[split], cfg.ways, cfg.shots, cfg.queries, seed=cfg.eval_seed)
    ep = sampler.sample(episodes)
    lr_kw: Dict[str, Any] = {"lr": cfg.inner_lr} if rates is None else {"learned_lr": rates}
    theta = ncp.adapt(
        model,
        ep.support_x,
        ep.support_y,
        eval_config(cfg),
        steps=cfg.horizon,
        mode="pruned",
        loss_fn=ncp.losses.cross_entropy,
        **lr_kw,
    ).params
    whole = dataclasses.replace(bootstrap(cfg), chunk_size=None)
    parts = dataclasses.replace(bootstrap(cfg), chunk_size=chunk)
    kw = {"loss_fn": ncp.losses.cross_entropy}

    def update(boot: ncp.BootstrapMetaLoss, x: Tensor, y: Tensor) -> Tensor:
        target = boot.target(model, theta, x, y, **kw)
        return torch.cat([(target[k] - theta[k]).flatten(1) for k in target], 1)

    exact = update(whole, ep.support_x, ep.support_y)
    mixed = shuffle_support(ep, torch.Generator().manual_seed(0))
    out: Dict[str, Any] = {
        "chunk": chunk,
        "support_points": int(ep.support_x.shape[1]),
        "bootstrap_steps": whole.steps,
        "bootstrap_lr": whole.lr,
        "tasks": episodes,
    }
    for order, (x, y) in (
        ("sorted", (ep.support_x, ep.support_y)),
        ("shuffled", (mixed.support_x, mixed.support_y)),
    ):
        approx = update(parts, x, y)
        cos = nn.functional.cosine_similarity(exact, approx, dim=1)
        out[order] = {
            "cosine_mean": cos.mean().item(),
            "cosine_min": cos.min().item(),
            "norm_ratio_mean": (approx.norm(dim=1) / exact.norm(dim=1)).mean().item(),
        }
    return out


def markdown(result: Dict[str, Any]) -> str:
    """The batch-norm table (layer-averaged gaps) and the bootstrap line."""
    lines = [
        "| where | kept set | mean shift (full-set std units) | abs log variance ratio |"
        " step cosine (assumed vs taken) |",
        "|---|---|---|---|---|",
    ]
    for where, sets in result["batch_norm"].items():
        for name, r in sets.items():
            shift = np.mean([v for k, v in r.items() if k.startswith("mean_shift")])
            logv = np.mean([v for k, v in r.items() if k.startswith("log_var_ratio")])
            lines.append(
                f"| {where} | {name} | {shift:.3f} | {logv:.3f} | {r['step_cosine']:.3f} |"
            )
    b = result.get("bootstrap")
    if b:
        lines += [
            "",
            f"bootstrap target update, chunks of {b['chunk']} vs all {b['support_points']} "
            f"points ({b['bootstrap_steps']} steps, lr {b['bootstrap_lr']:g}, {b['tasks']} tasks):",
            "",
            "| support order | cosine, mean | cosine, min | norm ratio |",
            "|---|---|---|---|",
        ]
        for order in ("sorted", "shuffled"):
            r = b[order]
            lines.append(
                f"| {order} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | "
                f"{r['norm_ratio_mean']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> Dict[str, Any]:
    """CLI entry point; prints the tables and writes ``--out`` (JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="folder of a trained run")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--split", choices=("train", "val", "test"), default="val")
    parser.add_argument(
        "--bootstrap-chunk",
        type=int,
        default=None,
        help="chunk of the bootstrap comparison; default the run's --bootstrap-chunk (skipped if none)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.episodes < 1:
        raise ValueError(f"`--episodes` must be >= 1, got {args.episodes}.")
    torch.set_num_threads(args.threads)
    cfg, model, rates = load_run(Path(args.run))
    if cfg.norm != "batch":
        raise ValueError(f"{args.run} uses --norm {cfg.norm}; the diagnosis is for batch norm.")
    result: Dict[str, Any] = {
        "run": args.run,
        "split": args.split,
        "episodes": args.episodes,
        "batch_norm": batch_norm_gaps(cfg, model, rates, args.episodes, args.split),
    }
    chunk = cfg.bootstrap_chunk if args.bootstrap_chunk is None else args.bootstrap_chunk
    if chunk is not None:
        result["bootstrap"] = bootstrap_chunking(
            cfg, model, rates, args.episodes, args.split, chunk
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
