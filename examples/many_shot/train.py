"""Meta-train Conv4 with MAML or GradNCP on many-shot episodes, then evaluate on test episodes.

Run from the repository root::

    python -m examples.many_shot.train --data glyphs --method gradncp --ways 5 --shots 100 \\
        --out runs/many_shot/glyphs-5w100s/gradncp-s0

Every setting is a flag (``--help``). A run folder holds ``config.json``, ``metrics.jsonl`` (one
JSON object per logged step), ``checkpoint.pt`` (model, optimizer, random states, step and
sampler state; a rerun with the same folder resumes from it exactly) and ``result.json`` (test
accuracy on validation and test episodes for each evaluation mode, mean and 95 % confidence
interval over the episodes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

import ncp

from .. import harness
from . import data
from .budget import saved_bytes
from .episodes import EpisodeSampler, shuffle_support
from .model import Conv4, build_model, count_parameters

METHODS = ("maml", "gradncp")
DATASETS = ("glyphs", "fashion", "mini-imagenet")
LEARNED_LR = ("step", "parameter", "none")
# Test-time adaptation modes: full-context steps, full-context steps rescaled to the pruned
# context's gradient norm (GradRescaler), and steps on the pruned context itself.
EVAL_MODES = ("plain", "rescaled", "pruned")
# Settings a resumed run may change: the horizon, logging, evaluation and where it runs. Any
# other setting must match the checkpoint's (an allow-list: a new setting is frozen by default).
MAY_CHANGE_ON_RESUME = (
    "outer_steps",
    "eval_episodes",
    "val_episodes",
    "eval_tasks",
    "test_steps",
    "eval_seed",
    "rescale",
    "eval_modes",
    "eval_splits",
    "device",
    "threads",
    "out",
    "log_every",
    "ckpt_every",
    "restart",
    "evaluate",
    "progress",
)


@dataclass
class RunConfig:
    """All settings of one run; the CLI flags map one to one (``--outer-steps`` is
    ``outer_steps``). Defaults are MAML's mini-ImageNet settings (Finn et al., 2017) and GradNCP's
    (Tack et al., 2023, Appendix A.2) where the paper's Table 12 gives none; see
    ``docs/examples_many_shot.md``."""

    # data
    data: str = "glyphs"
    data_root: str | None = None
    image_size: int = 32
    fonts: str = "debian"
    variants: int = 2
    split_seed: int = 0
    fashion_val: int = 1000
    # episodes
    ways: int = 5
    shots: int = 100
    queries: int = 15
    tasks: int = 4
    # model
    hidden: int = 64
    norm: str = "batch"
    # method
    method: str = "gradncp"
    maml_steps: int = 5
    inner_steps: int | None = None
    inner_lr: float = 0.01
    first_order: bool = False
    ratio: float = 0.25
    score: str = "gradncp"
    balance: bool = False
    learned_lr: str = "step"
    bootstrap_steps: int = 5
    bootstrap_lr: float | None = None
    bootstrap_weight: float = 100.0
    bootstrap_chunk: int | None = None
    # outer loop
    outer_steps: int = 500
    outer_lr: float = 1e-3
    clip: float | None = 1.0
    seed: int = 0
    # evaluation
    eval_episodes: int = 600
    val_episodes: int = 200
    eval_tasks: int = 10
    test_steps: int | None = None
    eval_seed: int = 1234
    rescale: str = "grad"
    eval_modes: Tuple[str, ...] = EVAL_MODES
    eval_splits: Tuple[str, ...] = ("val", "test")
    # running
    device: str = "cpu"
    threads: int | None = None
    out: str = "runs/many_shot/run"
    log_every: int = 10
    ckpt_every: int = 50
    restart: bool = False
    evaluate: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        choices = {
            "data": DATASETS,
            "method": METHODS,
            "fonts": ("builtin", "debian"),
            "norm": ("batch", "group"),
            "rescale": ("grad", "loss"),
            "learned_lr": LEARNED_LR,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"`--{name.replace('_', '-')}` must be one of {list(allowed)}, got "
                    f"{getattr(self, name)!r}."
                )
        self.eval_modes = tuple(self.eval_modes)
        self.eval_splits = tuple(self.eval_splits)
        for name, allowed in (("eval_modes", EVAL_MODES), ("eval_splits", ("val", "test"))):
            bad = [m for m in getattr(self, name) if m not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(
                    f"`--{name.replace('_', '-')}` takes one or more of {list(allowed)}, got "
                    f"{list(getattr(self, name))!r}."
                )
        for name in (
            "outer_steps",
            "eval_episodes",
            "val_episodes",
            "eval_tasks",
            "log_every",
            "ckpt_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(self, name)!r}."
                )
        if self.bootstrap_chunk is not None and self.bootstrap_chunk < 1:
            raise ValueError(
                f"`--bootstrap-chunk` must be >= 1 support points, got {self.bootstrap_chunk!r}; omit it "
                "to take each bootstrap step on the whole support set at once."
            )
        if self.clip is not None and not self.clip > 0:
            raise ValueError(
                f"`--clip` must be > 0, got {self.clip!r}; pass --no-clip for no clipping."
            )
        if self.fashion_val < 0:
            raise ValueError(f"`--fashion-val` must be >= 0 images, got {self.fashion_val!r}.")
        if self.data == "mini-imagenet" and self.data_root is None:
            raise ValueError(
                "`--data mini-imagenet` needs `--data-root`: the folder with images/ and "
                "train.csv, val.csv, test.csv."
            )

    @property
    def horizon(self) -> int:
        """Inner steps of this run's method: MAML's ``maml_steps``, GradNCP's ``inner_steps``
        (default ``maml_steps / ratio``, the paper's equal-memory rule)."""
        if self.method == "maml":
            return self.maml_steps
        if self.inner_steps is not None:
            return self.inner_steps
        return max(1, round(self.maml_steps / self.ratio))

    @property
    def test_horizon(self) -> int:
        """Test-time steps, the same for both methods (paper, Table 12): default GradNCP's
        horizon ``maml_steps / ratio``."""
        if self.test_steps is not None:
            return self.test_steps
        if self.inner_steps is not None:
            return self.inner_steps
        return max(1, round(self.maml_steps / self.ratio))

    @property
    def target_lr(self) -> float:
        """The bootstrap target's step size: ``bootstrap_lr``, default 5x the inner lr."""
        return 5 * self.inner_lr if self.bootstrap_lr is None else self.bootstrap_lr

    @property
    def channels(self) -> int:
        """Image channels of the data set."""
        return 3 if self.data == "mini-imagenet" else 1

    def to_dict(self) -> Dict[str, Any]:
        """The settings as a JSON-serialisable dict (tuples as lists, as JSON reads them back)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def pruner(cfg: RunConfig) -> ncp.ContextPruner:
    """GradNCP's pruner: global top-k, or class-balanced top-k with ``cfg.balance``."""
    if cfg.balance:
        return ncp.ContextPruner(ratio=cfg.ratio, score=cfg.score, balance_classes=cfg.ways)
    return ncp.ContextPruner(ratio=cfg.ratio, score=cfg.score)


def bootstrap(cfg: RunConfig) -> ncp.BootstrapMetaLoss:
    """GradNCP's bootstrap term; ``cfg.bootstrap_chunk`` accumulates each target step's gradient
    over chunks of that many support points."""
    kw: Dict[str, Any] = {
        "steps": cfg.bootstrap_steps,
        "lr": cfg.target_lr,
        "weight": cfg.bootstrap_weight,
    }
    if cfg.bootstrap_chunk is not None:
        kw["chunk_size"] = cfg.bootstrap_chunk
    return ncp.BootstrapMetaLoss(**kw)


def meta_config(cfg: RunConfig, method: str | None = None) -> ncp.MetaConfig:
    """The :class:`ncp.MetaConfig` of ``method`` (default ``cfg.method``)."""
    method = cfg.method if method is None else method
    if method == "maml":
        return ncp.MetaConfig(
            inner_steps=cfg.maml_steps,
            inner_lr=cfg.inner_lr,
            first_order=cfg.first_order,
            pruner=None,
            bootstrap=None,
        )
    return ncp.MetaConfig(
        inner_steps=dataclasses.replace(cfg, method="gradncp").horizon,
        inner_lr=cfg.inner_lr,
        first_order=cfg.first_order,
        pruner=pruner(cfg),
        bootstrap=bootstrap(cfg),
    )


def learned_lr(cfg: RunConfig, model: nn.Module, method: str | None = None) -> ncp.LearnedLR | None:
    """The learned inner rates of ``method`` (one per step, or per parameter entry and step),
    initialised at ``cfg.inner_lr``; None with ``--learned-lr none``."""
    if cfg.learned_lr == "none":
        return None
    steps = meta_config(cfg, method).inner_steps
    return ncp.LearnedLR(
        model, steps=steps, init=cfg.inner_lr, per_parameter=cfg.learned_lr == "parameter"
    )


def load_splits(cfg: RunConfig) -> Dict[str, data.ClassImages]:
    """The class-disjoint splits of ``cfg.data``."""
    if cfg.data == "mini-imagenet":
        assert cfg.data_root is not None
        return data.load_mini_imagenet(cfg.data_root, image_size=cfg.image_size)
    if cfg.data == "fashion":
        folder = data.fashion_folder() if cfg.data_root is None else Path(cfg.data_root)
        return data.load_fashion_mnist(
            folder,
            image_size=cfg.image_size,
            split_seed=cfg.split_seed,
            val_per_class=cfg.fashion_val,
        )
    return data.load_glyphs(
        bank_file=cfg.data_root,
        image_size=cfg.image_size,
        variants=cfg.variants,
        fonts=cfg.fonts,
        split_seed=cfg.split_seed,
    )


def mean_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95 % confidence interval,
    ``z * std / sqrt(n)`` with the sample standard deviation (``ddof=1``)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        raise ValueError(
            f"`values` needs at least 2 entries for a confidence interval, got {v.size}."
        )
    return float(v.mean()), float(z * v.std(ddof=1) / math.sqrt(v.size))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy ``(tasks,)`` of logits ``(tasks, points, ways)``."""
    return (logits.argmax(-1) == labels).float().mean(1)


def class_coverage(kept: torch.Tensor, labels: torch.Tensor, ways: int) -> Dict[str, float]:
    """How the kept points cover the classes, over every (inner step, task) pair.

    Args:
        kept: ``(steps, tasks, k)`` kept support indices (``MetaStepResult.kept_indices``).
        labels: ``(tasks, points)`` integer support labels in ``[0, ways)``.
        ways: number of classes.

    Returns:
        ``missing``: fraction of pairs in which at least one class has no kept point;
        ``min_share``: the smallest class's share of the kept points, averaged over pairs;
        ``pairs``: the number of pairs.
    """
    rows = torch.arange(labels.shape[0], device=labels.device)[None, :, None]
    kept_labels = labels[rows, kept]  # (steps, tasks, k)
    counts = torch.nn.functional.one_hot(kept_labels, ways).sum(2)  # (steps, tasks, ways)
    smallest = counts.min(-1).values.float()
    return {
        "missing": (smallest == 0).float().mean().item(),
        "min_share": (smallest / kept.shape[-1]).mean().item(),
        "pairs": int(smallest.numel()),
    }


def eval_config(cfg: RunConfig) -> ncp.MetaConfig:
    """The configuration test-time adaptation uses for every method: ``cfg.test_horizon``
    steps, and GradNCP's pruner (for the rescaled and pruned modes, MAML's runs included)."""
    return ncp.MetaConfig(
        inner_steps=cfg.test_horizon, inner_lr=cfg.inner_lr, pruner=pruner(cfg), bootstrap=None
    )


def evaluate(
    model: Conv4,
    cfg: RunConfig,
    split: data.ClassImages,
    *,
    mode: str = "plain",
    episodes: int | None = None,
    rates: ncp.LearnedLR | None = None,
) -> Tuple[np.ndarray, Dict[str, float] | None]:
    """Accuracy on each of ``episodes`` episodes of ``split`` (seeded by ``cfg.eval_seed``, so
    every method sees the same episodes), and the class coverage of the pruned mode.

    Each episode adapts for ``cfg.test_horizon`` first-order steps (:func:`ncp.adapt`), the same
    for every method: on the full support set (``mode="plain"``), on the full support set with
    each gradient rescaled to the pruned support's norm (``"rescaled"``, Eq. 4; ``cfg.rescale``
    picks the rescaler), or on the support points the pruner keeps (``"pruned"``). ``rates``
    are the learned inner rates (steps past their horizon reuse the last one).
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"`mode` must be one of {list(EVAL_MODES)}, got {mode!r}.")
    episodes = cfg.eval_episodes if episodes is None else episodes
    meta = eval_config(cfg)
    how = {"plain": "full", "pruned": "pruned", "rescaled": ncp.GradRescaler(mode=cfg.rescale)}  # type: ignore[arg-type]
    sampler = EpisodeSampler(split, cfg.ways, cfg.shots, cfg.queries, seed=cfg.eval_seed)
    device = torch.device(cfg.device)
    lr_kw: Dict[str, Any] = {"lr": cfg.inner_lr} if rates is None else {"learned_lr": rates}
    accs: List[np.ndarray] = []
    cover: List[Dict[str, float]] = []
    bar = harness.progress(episodes, desc=f"{split.name} {cfg.method} {mode}", enabled=cfg.progress)
    done = 0
    while done < episodes:
        n = min(cfg.eval_tasks, episodes - done)
        ep = sampler.sample(n).to(device)
        adapted = ncp.adapt(
            model,
            ep.support_x,
            ep.support_y,
            meta,
            steps=cfg.test_horizon,
            mode=how[mode],
            loss_fn=ncp.losses.cross_entropy,
            **lr_kw,
        )
        if mode == "pruned" and adapted.kept_indices is not None:
            cover.append(class_coverage(adapted.kept_indices, ep.support_y, cfg.ways))
        with torch.no_grad():
            pred = ncp.forward(model, adapted.params, ep.query_x)
            accs.append(accuracy(pred, ep.query_y).cpu().numpy())
        done += n
        bar.update(n)
    bar.close()
    coverage = None
    if cover:
        pairs = sum(c["pairs"] for c in cover)
        coverage = {
            k: sum(c[k] * c["pairs"] for c in cover) / pairs for k in ("missing", "min_share")
        }
    return np.concatenate(accs), coverage


def train(
    cfg: RunConfig, splits: Dict[str, data.ClassImages] | None = None
) -> Tuple[Conv4, ncp.LearnedLR | None]:
    """Meta-train (resuming from ``cfg.out/checkpoint.pt`` when present) and return the
    model and its learned inner rates (None with ``--learned-lr none``); writes
    ``config.json``, ``metrics.jsonl`` and ``checkpoint.pt`` in ``cfg.out`` (see
    :mod:`examples.harness`)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    splits = load_splits(cfg) if splits is None else splits
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / harness.CHECKPOINT
    if cfg.restart:
        (run_dir / "result.json").unlink(missing_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    model = build_model(cfg.ways, cfg.channels, cfg.hidden, cfg.image_size, cfg.norm, cfg.seed).to(
        device
    )
    rates = learned_lr(cfg, model)
    trained = list(model.parameters()) + ([] if rates is None else list(rates.parameters()))
    opt = torch.optim.Adam(trained, lr=cfg.outer_lr)
    sampler = EpisodeSampler(splits["train"], cfg.ways, cfg.shots, cfg.queries, seed=cfg.seed)
    meta = meta_config(cfg)
    torch.manual_seed(cfg.seed)
    start, log = harness.resume(
        run_dir,
        cfg.to_dict(),
        may_change=MAY_CHANGE_ON_RESUME,
        states={"model": model, "learned_lr": rates, "optimizer": opt, "sampler": sampler},
        generators={},
        device=device,
        restart=cfg.restart,
        defaults=RunConfig().to_dict(),
    )

    bar = harness.progress(
        cfg.outer_steps, initial=start, desc=f"{cfg.method} K={cfg.horizon}", enabled=cfg.progress
    )
    t0 = time.perf_counter()
    for step in range(start, cfg.outer_steps):
        # Shuffled so that the chunks of a chunked bootstrap mix the classes (shuffle_support).
        ep = shuffle_support(sampler.sample(cfg.tasks)).to(device)
        out = ncp.meta_step(
            model, ep.batch(), meta, loss_fn=ncp.losses.cross_entropy, learned_lr=rates
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = None
        if cfg.clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.clip).item()
        opt.step()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.outer_steps:
            with torch.no_grad():
                acc = accuracy(ncp.forward(model, out.params, ep.query_x), ep.query_y).mean()
            record: Dict[str, Any] = {
                "step": done,
                "loss": out.loss.item(),
                "query_loss": out.query_loss.mean().item(),
                "query_acc": acc.item(),
                "bootstrap_loss": None
                if out.bootstrap_loss is None
                else out.bootstrap_loss.mean().item(),
                "grad_norm": grad_norm,
                "seconds": time.perf_counter() - t0,
            }
            if rates is not None and not rates.per_parameter:
                record["inner_lr"] = [round(v, 5) for v in rates.rates[0].tolist()]
            if out.kept_indices is not None:
                cover = class_coverage(out.kept_indices, ep.support_y, cfg.ways)
                record["missing_class"] = cover["missing"]
                record["min_class_share"] = cover["min_share"]
            log.write(record)
            bar.set_postfix(loss=f"{record['query_loss']:.3f}", acc=f"{record['query_acc']:.2f}")
        if done % cfg.ckpt_every == 0 or done == cfg.outer_steps:
            harness.save_checkpoint(
                {
                    "step": done,
                    "model": model.state_dict(),
                    "learned_lr": None if rates is None else rates.state_dict(),
                    "optimizer": opt.state_dict(),
                    "sampler": sampler.state_dict(),
                    "rng": harness.rng_state(device),
                    "settings": cfg.to_dict(),
                },
                ckpt_path,
            )
        bar.update(1)
    bar.close()
    return model, rates


def training_coverage(run_dir: str | Path) -> Dict[str, float] | None:
    """Mean class coverage of the pruned inner steps over the logged outer steps of a run
    (``metrics.jsonl``), or None for a run without pruning."""
    rows = harness.MetricsLog(Path(run_dir) / harness.LOG).records()
    rows = [r for r in rows if r.get("missing_class") is not None]
    if not rows:
        return None
    return {
        "missing": float(np.mean([r["missing_class"] for r in rows])),
        "min_share": float(np.mean([r["min_class_share"] for r in rows])),
        "logged_steps": len(rows),
    }


def run(cfg: RunConfig) -> Dict[str, Any]:
    """Train, measure the saved bytes of one outer step, evaluate every mode of
    ``cfg.eval_modes`` on every split of ``cfg.eval_splits`` and write ``result.json``;
    returns its content (``result["eval"][split][mode]`` holds mean, ci95, episodes)."""
    splits = load_splits(cfg)
    t0 = time.perf_counter()
    model, rates = train(cfg, splits)
    train_s = time.perf_counter() - t0
    result: Dict[str, Any] = {
        "method": cfg.method,
        "inner_steps": cfg.horizon,
        "test_steps": cfg.test_horizon,
        "parameters": count_parameters(model),
        "train_seconds": train_s,
        "torch": torch.__version__,
        "device": cfg.device,
        "settings": cfg.to_dict(),
        "learned_lr": None
        if rates is None or rates.per_parameter
        else [float(v) for v in rates.rates[0].tolist()],
        "training_coverage": training_coverage(cfg.out),
    }
    probe = EpisodeSampler(splits["train"], cfg.ways, cfg.shots, cfg.queries, seed=cfg.seed + 999)
    batch = probe.sample(1).to(torch.device(cfg.device)).batch()
    result["saved_bytes_per_task"] = saved_bytes(model, batch, meta_config(cfg), learned_lr=rates)
    if cfg.evaluate:
        result["eval"] = {}
        for name in cfg.eval_splits:
            if name not in splits:
                raise ValueError(
                    f"`--eval-splits` asks for {name!r} but {cfg.data} has only {sorted(splits)}; "
                    "for fashion pass --fashion-val > 0."
                )
            episodes = cfg.val_episodes if name == "val" else cfg.eval_episodes
            result["eval"][name] = {}
            for mode in cfg.eval_modes:
                t1 = time.perf_counter()
                accs, cover = evaluate(
                    model, cfg, splits[name], mode=mode, episodes=episodes, rates=rates
                )
                mean, ci = mean_ci(accs)
                result["eval"][name][mode] = {
                    "mean": mean,
                    "ci95": ci,
                    "episodes": len(accs),
                    "coverage": cover,
                    "seconds": time.perf_counter() - t1,
                }
    (Path(cfg.out) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`RunConfig` field."""
    d = RunConfig()
    a = parser.add_argument
    g = parser.add_argument_group("data")
    g.add_argument("--data", choices=DATASETS, default=d.data)
    g.add_argument(
        "--data-root",
        default=d.data_root,
        help="mini-ImageNet: folder with images/ and the csvs; fashion: folder of the IDX .gz files (default: fetched into the cache); glyphs: a rendered bank .npz (default: rendered from fonts)",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=d.image_size,
        help="side images are resized to (mini-ImageNet: 84)",
    )
    g.add_argument(
        "--fonts",
        choices=("builtin", "debian"),
        default=d.fonts,
        help="glyph fonts: builtin (no download) or debian (20 font packages fetched into the cache)",
    )
    g.add_argument(
        "--variants", type=int, default=d.variants, help="glyph renderings per (character, font)"
    )
    g.add_argument(
        "--split-seed",
        type=int,
        default=d.split_seed,
        help="seed of the class split (glyphs, fashion)",
    )
    g.add_argument(
        "--fashion-val",
        type=int,
        default=d.fashion_val,
        help="fashion: images of each training class held out as the validation split",
    )
    g = parser.add_argument_group("episodes")
    g.add_argument("--ways", type=int, default=d.ways)
    g.add_argument("--shots", type=int, default=d.shots)
    g.add_argument("--queries", type=int, default=d.queries)
    g.add_argument(
        "--tasks", type=int, default=d.tasks, help="episodes per outer step (meta-batch)"
    )
    g = parser.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=d.hidden, help="Conv4 filters per layer")
    g.add_argument(
        "--norm",
        choices=("batch", "group"),
        default=d.norm,
        help="batch: BatchNorm without running statistics; group: GroupNorm",
    )
    g = parser.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default=d.method)
    g.add_argument(
        "--maml-steps",
        type=int,
        default=d.maml_steps,
        help="MAML's inner steps K (sets the memory budget)",
    )
    g.add_argument(
        "--inner-steps",
        type=int,
        default=d.inner_steps,
        help="GradNCP's inner steps; default maml-steps / ratio",
    )
    g.add_argument("--inner-lr", type=float, default=d.inner_lr)
    g.add_argument("--first-order", action="store_true")
    g.add_argument(
        "--ratio", type=float, default=d.ratio, help="fraction of the support set kept per step"
    )
    g.add_argument("--score", choices=("gradncp", "loss", "random"), default=d.score)
    g.add_argument(
        "--balance",
        action="store_true",
        help="class-balanced pruning: each class keeps its share of the kept points "
        "(ContextPruner(balance_classes=ways)); default the paper's global top-k",
    )
    g.add_argument(
        "--learned-lr",
        choices=LEARNED_LR,
        default=d.learned_lr,
        help="meta-learned inner rates (ncp.LearnedLR), initialised at --inner-lr: one per "
        "step (default), one per parameter entry and step, or none (fixed --inner-lr)",
    )
    g.add_argument(
        "--bootstrap-steps", type=int, default=d.bootstrap_steps, help="bootstrap steps L"
    )
    g.add_argument(
        "--bootstrap-lr",
        type=float,
        default=d.bootstrap_lr,
        help="bootstrap step size; default 5x --inner-lr",
    )
    g.add_argument(
        "--bootstrap-weight", type=float, default=d.bootstrap_weight, help="bootstrap weight lambda"
    )
    g.add_argument(
        "--bootstrap-chunk",
        type=int,
        default=d.bootstrap_chunk,
        help="accumulate each bootstrap step's gradient over chunks of this many support "
        "points (bounds its transient graph; batch norm then uses per-chunk statistics)",
    )
    g = parser.add_argument_group("outer loop")
    g.add_argument("--outer-steps", type=int, default=d.outer_steps)
    g.add_argument("--outer-lr", type=float, default=d.outer_lr)
    g.add_argument(
        "--clip", type=float, default=d.clip, help="clip the meta-gradient norm to this value"
    )
    g.add_argument("--no-clip", dest="clip", action="store_const", const=None)
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-episodes", type=int, default=d.eval_episodes, help="test-split episodes")
    g.add_argument(
        "--val-episodes", type=int, default=d.val_episodes, help="validation-split episodes"
    )
    g.add_argument(
        "--eval-tasks", type=int, default=d.eval_tasks, help="test episodes adapted at once"
    )
    g.add_argument(
        "--test-steps",
        type=int,
        default=d.test_steps,
        help="test-time steps for every method; default GradNCP's horizon",
    )
    g.add_argument("--eval-seed", type=int, default=d.eval_seed)
    g.add_argument(
        "--rescale",
        choices=("grad", "loss"),
        default=d.rescale,
        help="the rescaler of the rescaled mode (ncp.GradRescaler)",
    )
    g.add_argument(
        "--eval-modes",
        nargs="+",
        choices=EVAL_MODES,
        default=list(d.eval_modes),
        help="test-time modes: full support, full support rescaled, pruned support",
    )
    g.add_argument("--eval-splits", nargs="+", choices=("val", "test"), default=list(d.eval_splits))
    g = parser.add_argument_group("running")
    harness.add_running_arguments(g, d.to_dict())
    g.add_argument("--no-eval", dest="evaluate", action="store_false")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    del a


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """A :class:`RunConfig` from parsed flags."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(argv: Sequence[str] | None = None) -> Dict[str, Any]:
    """CLI entry point; prints the test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    result = run(cfg)
    for split, modes in result.get("eval", {}).items():
        for mode, t in modes.items():
            print(
                f"{cfg.method} K={cfg.horizon} {split} {mode}: accuracy {100 * t['mean']:.2f} "
                f"+- {100 * t['ci95']:.2f} % over {t['episodes']} episodes",
                file=sys.stderr,
            )
    return result


if __name__ == "__main__":
    main()
