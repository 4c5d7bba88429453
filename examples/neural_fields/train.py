"""Meta-learn a neural field initialisation with MAML or GradNCP, with checkpoints that resume.

All the paper's hyperparameters are flags whose defaults are the paper's values (Appendix A.2):
outer Adam with lr 1e-5, batch 8 (the paper sets it per data set); MAML K=4; GradNCP ratio 0.25
(0.5 for audio and the sphere, the paper's LibriSpeech and ERA5) and K = MAML's K / ratio (16;
8 at ratio 0.5: the same memory), bootstrap L=5, lambda=100; inner lr 1e-2; SIREN 5x256 (7
layers for video, w0=50 on the sphere). Not in the paper: the bootstrap target's lr (5e-2 here;
Algorithm 1 writes the inner rate) and the grad-norm clip (1.0). Runs write to ``--out``:

- ``checkpoint.pt``: model, optimizer, RNG states (torch, numpy, python), the batch sampler,
  step. A run started again with the same ``--out`` resumes from it exactly.
- ``metrics.jsonl``: one JSON object per logged step (outer loss, reconstruction loss) and per
  periodic evaluation (test PSNR after ``--test-steps`` steps).
- ``snapshots/step_NNNNNN.pt`` (with ``--snapshot-every n``): the meta-parameters (model and
  learned rates) at step 0 and every n steps, for studies over meta-training
  (``score_quality``); ``load_run(run, at_step=n)`` reads one.

Run from the repository root::

    python -m examples.neural_fields.train --data text --method gradncp --out runs/nf/text
    python -m examples.neural_fields.train --data image_folder --root ~/img_align_celeba \\
        --resolution 178 --method maml --out runs/nf/celeba_maml
    python -m examples.neural_fields.train --data text --smoke --out /tmp/nf_smoke
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make `examples` and `ncp` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import ncp
from examples import harness
from examples.neural_fields import datasets
from examples.neural_fields.metrics import psnr
from examples.neural_fields.models import FourierFeatureMLP, NeRV, Siren

METHODS = ("maml", "gradncp", "reptile")
SCORES = ("gradncp", "loss", "random")
# --score-dtype: None keeps the scoring pass in the parameters' dtype
SCORE_DTYPES: Dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}
CHECKPOINT = harness.CHECKPOINT
LOG = harness.LOG
SNAPSHOTS = "snapshots"  # --snapshot-every: the meta-parameters at steps 0, n, 2n, ...
LEARNED_LR = ("none", "step", "param")
# Settings a resumed run may change: they do not alter the optimisation so far.
MAY_CHANGE_ON_RESUME = (
    "outer_steps",
    "threads",
    "eval_every",
    "ckpt_every",
    "snapshot_every",
    "log_every",
    "device",
    "out",
    "restart",
)

# The paper's values (Appendix A.2), defaults of the flags.
PAPER: Dict[str, Any] = dict(
    data="text",
    root=None,
    variable=None,
    method="gradncp",
    model="siren",
    hidden=256,
    layers=None,  # 5; 7 for video
    w0=None,  # 30; 50 on the sphere
    ff_scale=10.0,
    outer_steps=150_000,
    outer_lr=1e-5,
    clip=1.0,
    batch=8,
    inner_steps=None,  # MAML 4, GradNCP 4 / ratio
    inner_lr=1e-2,
    learned_lr="none",  # the paper learns per-step rates (Meta-SGD, its ref. [35]): "step"/"param"
    first_order=False,
    ratio=None,  # 0.25; 0.5 for audio and the sphere
    score="gradncp",
    score_dtype="float32",  # the scoring forward pass; bfloat16 is ContextPruner(score_dtype=...)
    bootstrap_steps=5,
    bootstrap_lr=5e-2,
    bootstrap_weight=100.0,
    bootstrap_chunk=None,  # all points at once; n: each target step's gradient in chunks of n
    bootstrap_context="full",  # the target's context (paper: full; Table 9: pruned, random)
    resolution=178,
    seconds=1.0,
    audio_bound=50.0,
    frames=16,
    grid_stride=1,
    test_fraction=0.1,
    test_steps=16,
    eval_every=1000,
    eval_signals=16,
    log_every=10,
    ckpt_every=500,
    snapshot_every=0,  # n > 0: keep the initialisation at step 0 and every n steps (snapshots/)
    seed=0,
    device="cpu",
    threads=None,
    out=os.path.join("runs", "neural_fields"),
    restart=False,
)
# A run of a few seconds: tiny signals and model, two steps (for tests).
SMOKE: Dict[str, Any] = dict(
    hidden=16,
    layers=3,
    outer_steps=2,
    batch=2,
    resolution=16,
    seconds=0.01,
    frames=4,
    grid_stride=6,
    test_steps=2,
    eval_every=2,
    eval_signals=2,
    log_every=1,
    ckpt_every=1,
)


MAML_STEPS = 4  # the paper's K for MAML (Learnit) in its main tables
# Data sets whose paper counterpart (LibriSpeech, ERA5) uses ratio 0.5 (Appendix A.2).
HALF_RATIO = ("speech", "audio_folder", "climate", "grid_file")


def paper_ratio(data: str) -> float:
    """The paper's kept fraction for ``data``: 0.5 for audio and the sphere, 0.25 otherwise."""
    return 0.5 if data in HALF_RATIO else 0.25


def paper_inner_steps(method: str, ratio: float) -> int:
    """The paper's K: 4 for MAML; 4 / ratio for GradNCP, which keeps its memory equal."""
    return MAML_STEPS if method in ("maml", "reptile") else max(1, round(MAML_STEPS / ratio))


def resolve(s: Dict[str, Any]) -> Dict[str, Any]:
    """``s`` with the per-data defaults (``ratio``, ``inner_steps``) filled in; a name that is
    not a setting of :data:`PAPER` is refused (ncp 0.2.0's ``steps`` and ``lr`` with a hint)."""
    unknown = sorted(set(s) - set(PAPER))
    if unknown:
        hints = [f"{k} is now {harness.RENAMED[k]}" for k in unknown if k in harness.RENAMED]
        raise ValueError(
            f"`settings` has names that are not train settings: {unknown}"
            + (f" ({'; '.join(hints)})" if hints else "")
            + "; see train.PAPER for the names."
        )
    s = dict(s)
    if s["ratio"] is None:
        s["ratio"] = paper_ratio(s["data"])
    if s["inner_steps"] is None:
        s["inner_steps"] = paper_inner_steps(s["method"], s["ratio"])
    return s


def make_config(s: Dict[str, Any]) -> ncp.MetaConfig:
    """The :class:`ncp.MetaConfig` of a run: MAML (full context, no bootstrap), Reptile (the
    same, first order) or GradNCP."""
    s = resolve(s)
    steps = s["inner_steps"]
    if s["method"] in ("maml", "reptile"):
        return ncp.MetaConfig(
            inner_steps=steps,
            inner_lr=s["inner_lr"],
            first_order=s["first_order"] or s["method"] == "reptile",
            pruner=None,
            bootstrap=None,
        )
    generator = (
        torch.Generator(s["device"]).manual_seed(s["seed"]) if s["score"] == "random" else None
    )
    bootstrap = None
    if s["bootstrap_steps"] > 0:
        bootstrap = ncp.BootstrapMetaLoss(
            steps=s["bootstrap_steps"],
            lr=s["bootstrap_lr"],
            weight=s["bootstrap_weight"],
            chunk_size=s.get("bootstrap_chunk"),
            context=s.get("bootstrap_context", "full"),
        )
    return ncp.MetaConfig(
        inner_steps=steps,
        inner_lr=s["inner_lr"],
        first_order=s["first_order"],
        pruner=ncp.ContextPruner(
            ratio=s["ratio"],
            score=s["score"],
            generator=generator,
            score_dtype=SCORE_DTYPES[s.get("score_dtype", "float32")],
        ),
        bootstrap=bootstrap,
    )


def reptile_step(model: nn.Module, x: Tensor, y: Tensor, cfg: ncp.MetaConfig) -> Tensor:
    """Reptile (Nichol et al., 2018; the paper's Table 8): adapt every task for
    ``cfg.inner_steps`` full-context SGD steps without a graph, then set each parameter's
    gradient to ``theta_0 - mean over tasks of theta_K`` for the outer optimizer. Returns the
    tasks' losses at ``theta_K``, ``(tasks,)``."""
    with torch.no_grad():
        adapted = ncp.adapt(model, x, y, cfg)
        losses = cfg.loss_fn(ncp.forward(model, adapted.params, x), y).mean(1)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.grad = p.detach() - adapted.params[name].mean(0)
    return losses


def make_learned_lr(
    s: Dict[str, Any], model: nn.Module, cfg: ncp.MetaConfig
) -> ncp.LearnedLR | None:
    """Meta-learned inner rates (``--learned-lr step``: one per step; ``param``: one per
    parameter entry and step), starting at ``--inner-lr``; None for a fixed rate."""
    mode = s.get("learned_lr", "none")
    if mode == "none":
        return None
    return ncp.LearnedLR(model, cfg.inner_steps, init=s["inner_lr"], per_parameter=mode == "param")


def make_model(s: Dict[str, Any], signals: datasets.SignalSet) -> nn.Module:
    """SIREN (w0 30, 50 on the sphere; 5 layers, 7 for video), a Fourier-feature MLP, or NeRV
    for video (``--layers`` NeRV blocks, default 3; ``--hidden`` its channels and MLP width)."""
    if s["model"] == "nerv":
        frame = signals.test.shape[2:]  # (H, W, C)
        if signals.kind != "video" or frame[0] != frame[1]:
            raise ValueError(
                f"--model nerv decodes square video frames; --data {s['data']} holds "
                f"{signals.kind} signals of shape {tuple(signals.test.shape[1:])}."
            )
        width = s["hidden"]
        return NeRV(frame[2], frame[0], blocks=s["layers"] or 3, channels=width, hidden=width)
    layers = s["layers"] or (7 if signals.kind == "video" else 5)
    if s["model"] == "ffn":
        return FourierFeatureMLP(
            signals.in_features, signals.out_features, s["hidden"], layers, scale=s["ff_scale"]
        )
    w0 = s["w0"] or (50.0 if signals.kind == "sphere" else 30.0)
    return Siren(signals.in_features, signals.out_features, s["hidden"], layers, w0=w0)


def load_data(s: Dict[str, Any]) -> datasets.SignalSet:
    """The run's :class:`~datasets.SignalSet` (whole frames as points for NeRV)."""
    signal_set = datasets.build(
        s["data"],
        resolution=s["resolution"],
        seconds=s["seconds"],
        frames=s["frames"],
        grid_stride=s["grid_stride"],
        test_fraction=s["test_fraction"],
        root=s["root"],
        variable=s["variable"],
        seed=s["seed"],
        audio_bound=s.get("audio_bound", PAPER["audio_bound"]),
    )
    signal_set.frame_points = s.get("model") == "nerv"
    return signal_set


def test_psnr(
    model: nn.Module,
    cfg: ncp.MetaConfig,
    signals: datasets.SignalSet,
    test: Tensor,
    *,
    steps: int,
    learned_lr: ncp.LearnedLR | None = None,
    chunk: int = 8,
) -> float:
    """Mean test PSNR after ``steps`` full-context steps (predictions clamped to the range)."""
    device = next(model.parameters()).device
    values = []
    low = -1.0 if signals.kind == "audio" else 0.0
    for part in test.split(chunk):
        x, y = signals.context(part.to(device))
        params = ncp.adapt(model, x, y, cfg, steps=steps, learned_lr=learned_lr).params
        with torch.no_grad():
            pred = ncp.forward(model, params, x).clamp(low, low + signals.data_range)
        values.append(psnr(pred, y, signals.data_range))
    return torch.cat(values).mean().item()


def outer_gradient(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: ncp.MetaConfig,
    method: str,
    rates: ncp.LearnedLR | None,
) -> Tuple[Tensor, Tensor]:
    """Put one outer step's gradient in ``.grad`` (``meta_step`` and ``backward``; for Reptile
    :func:`reptile_step`) and return the outer loss and the per-task query losses, detached."""
    if method == "reptile":
        query = reptile_step(model, x, y, cfg)
        return query.mean(), query
    out = ncp.meta_step(model, (x, y), cfg, learned_lr=rates)
    out.loss.backward()
    return out.loss.detach(), out.query_loss.detach()


def train(settings: Dict[str, Any], *, stop_after: int | None = None) -> Dict[str, Any]:
    """Meta-train; resume from ``settings["out"]/checkpoint.pt`` when it exists.

    Args:
        settings: the flags as a dict (see :data:`PAPER`).
        stop_after: leave after this many outer steps of this call (a simulated interruption,
            for tests), having written a checkpoint.

    Returns:
        ``model``, ``config``, ``learned_lr`` (or None), ``signals``, ``step`` (outer steps
        done) and ``out``.
    """
    s = resolve(settings)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    device = torch.device(s["device"])
    ckpt_path = os.path.join(s["out"], CHECKPOINT)
    signals = load_data(s)
    torch.manual_seed(s["seed"])
    random.seed(s["seed"])
    np.random.seed(s["seed"])
    model = make_model(s, signals).to(device)
    cfg = make_config(s)
    rates = make_learned_lr(s, model, cfg)
    meta_params = list(model.parameters()) + ([] if rates is None else list(rates.parameters()))
    opt = torch.optim.Adam(meta_params, lr=s["outer_lr"])
    sampler = torch.Generator().manual_seed(s["seed"] + 1)
    generators = {
        "sampler": sampler,
        "pruner": cfg.pruner.generator if cfg.pruner is not None else None,
    }
    step, log = harness.resume(
        s["out"],
        s,
        may_change=MAY_CHANGE_ON_RESUME,
        states={"model": model, "learned_lr": rates, "optimizer": opt},
        generators=generators,
        device=device,
        restart=s["restart"],
        defaults=PAPER,
    )
    if step == 0:
        log.write({"step": 0, "event": "start", "settings": s, "data": signals.describe()})
    every = s["snapshot_every"]

    def save() -> None:
        harness.save_checkpoint(
            {
                "model": model.state_dict(),
                "learned_lr": None if rates is None else rates.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": harness.rng_state(device, **generators),
                "step": step,
                "settings": s,
            },
            ckpt_path,
        )

    def snapshot() -> None:
        os.makedirs(os.path.join(s["out"], SNAPSHOTS), exist_ok=True)
        state = {"step": step, "model": model.state_dict(), "settings": s}
        state["learned_lr"] = None if rates is None else rates.state_dict()
        harness.save_checkpoint(state, snapshot_path(s["out"], step))

    if every and step == 0:
        snapshot()  # the initialisation before any meta-training
    # meta-training seconds of earlier calls (a resumed run), from the last logged record
    trained_before = max((r.get("train_seconds", 0.0) for r in log.records()), default=0.0)
    total = s["outer_steps"]
    end = total if stop_after is None else min(total, step + stop_after)
    bar = harness.progress(total, initial=step, desc=f"{s['method']} {s['data']}")
    start = time.perf_counter()
    excluded = 0.0  # seconds of this call spent in evaluations and checkpoints
    while step < end:
        idx = torch.randint(signals.n_train, (s["batch"],), generator=sampler).tolist()
        x, y = signals.context(signals.train_batch(idx).to(device))
        opt.zero_grad(set_to_none=True)
        if step == 0:
            with ncp.MemoryMeter(device if device.type == "cuda" else None) as meter:
                loss, query = outer_gradient(model, x, y, cfg, s["method"], rates)
            rec = {"step": 0, "event": "memory", "peak_saved_bytes": meter.peak_saved_bytes}
            if meter.peak_cuda_bytes is not None:  # the allocator's peak, on a GPU
                rec["peak_cuda_bytes"] = meter.peak_cuda_bytes
            log.write(rec)
        else:
            loss, query = outer_gradient(model, x, y, cfg, s["method"], rates)
        nn.utils.clip_grad_norm_(meta_params, s["clip"])
        opt.step()
        step += 1
        bar.update(1)
        if step % s["log_every"] == 0 or step == end:
            q = query.mean().item()
            rec = {"step": step, "loss": loss.item(), "query_loss": q}
            rec["seconds"] = time.perf_counter() - start
            rec["train_seconds"] = trained_before + rec["seconds"] - excluded
            log.write(rec)
            bar.set_postfix(loss=f"{q:.4g}")
        if step % s["eval_every"] == 0 or step == total:
            paused = time.perf_counter()
            done_s = trained_before + paused - start - excluded
            test = signals.test[: s["eval_signals"]]
            value = test_psnr(model, cfg, signals, test, steps=s["test_steps"], learned_lr=rates)
            log.write({"step": step, "event": "eval", "psnr": value, "train_seconds": done_s})
            bar.write(f"step {step}: test PSNR {value:.2f} dB after {s['test_steps']} steps")
            excluded += time.perf_counter() - paused
        if every and step % every == 0:
            paused = time.perf_counter()
            snapshot()
            excluded += time.perf_counter() - paused
        if step % s["ckpt_every"] == 0 or step == end:
            paused = time.perf_counter()
            save()
            excluded += time.perf_counter() - paused
    bar.close()
    return {
        "model": model,
        "config": cfg,
        "learned_lr": rates,
        "signals": signals,
        "step": step,
        "out": s["out"],
    }


def snapshot_path(out: str, step: int) -> str:
    """The file of the snapshot taken after ``step`` outer steps in the run folder ``out``."""
    return os.path.join(out, SNAPSHOTS, f"step_{step:06d}.pt")


def snapshot_steps(out: str) -> List[int]:
    """The outer steps at which the run folder ``out`` kept a snapshot, in order."""
    folder = os.path.join(out, SNAPSHOTS)
    if not os.path.isdir(folder):
        return []
    names = (f for f in os.listdir(folder) if f.startswith("step_") and f.endswith(".pt"))
    return sorted(int(f[5:-3]) for f in names)


def read_log(out: str) -> List[Dict[str, Any]]:
    """The records of ``out/metrics.jsonl``."""
    return harness.MetricsLog(os.path.join(out, LOG)).records()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of :data:`PAPER` (shared with ``evaluate``)."""
    d = PAPER
    a = parser.add_argument
    a("--data", choices=datasets.NAMES, help=f"data set ({d['data']})")
    a("--root", help="folder (or grid file) of your own data, for *_folder and grid_file")
    a("--variable", help="variable of a grid_file")
    a("--method", choices=METHODS, help=f"meta-learning method ({d['method']})")
    a(
        "--model",
        choices=("siren", "ffn", "nerv"),
        help="SIREN, Fourier-feature MLP, or NeRV (video; a frame is a point) (siren)",
    )
    a("--hidden", type=int, help=f"width ({d['hidden']})")
    a("--layers", type=int, help="linear layers (5; 7 for video); NeRV blocks (3)")
    a("--w0", type=float, help="SIREN frequency (30; 50 on the sphere)")
    a("--ff-scale", type=float, help=f"Fourier-feature scale ({d['ff_scale']:g})")
    a("--outer-steps", type=int, help=f"outer steps ({d['outer_steps']})")
    a("--outer-lr", type=float, help=f"outer Adam learning rate ({d['outer_lr']:g})")
    a("--clip", type=float, help=f"outer grad-norm clip ({d['clip']:g})")
    a("--batch", type=int, help=f"signals per outer step ({d['batch']})")
    a("--inner-steps", type=int, help="K (MAML 4, GradNCP 4 / ratio)")
    a("--inner-lr", type=float, help=f"inner SGD learning rate ({d['inner_lr']:g})")
    a("--learned-lr", choices=LEARNED_LR, help="meta-learned inner rates, Meta-SGD (none)")
    a("--first-order", action="store_true", default=None, help="first-order MAML")
    a("--ratio", type=float, help="GradNCP kept fraction gamma (0.25; 0.5 audio and sphere)")
    a("--score", choices=SCORES, help=f"point score ({d['score']})")
    a(
        "--score-dtype",
        choices=tuple(SCORE_DTYPES),
        help="dtype of the scoring forward pass; the inner steps stay float32 (float32)",
    )
    a("--bootstrap-steps", type=int, help=f"L, 0 turns the bootstrap off ({d['bootstrap_steps']})")
    a("--bootstrap-lr", type=float, help=f"bootstrap target lr ({d['bootstrap_lr']:g})")
    a("--bootstrap-weight", type=float, help=f"lambda ({d['bootstrap_weight']:g})")
    a(
        "--bootstrap-context",
        choices=("full", "pruned", "random"),
        help="the bootstrap target's context: full (the paper's), pruned by the score, or a "
        "random subset of the pruned size (Table 9) (full)",
    )
    a(
        "--bootstrap-chunk",
        type=int,
        help="accumulate each bootstrap step's gradient over chunks of this many points, so "
        "its transient full-context graph stays out of the peak (all at once)",
    )
    a("--resolution", type=int, help=f"image / frame side ({d['resolution']})")
    a("--seconds", type=float, help=f"audio clip length ({d['seconds']:g})")
    a("--audio-bound", type=float, help=f"audio coordinates on [-B, B] ({d['audio_bound']:g})")
    a("--frames", type=int, help=f"video clip frames ({d['frames']})")
    a("--grid-stride", type=int, help=f"keep 1 grid point in N per axis ({d['grid_stride']})")
    a("--test-fraction", type=float, help=f"held-out share ({d['test_fraction']:g})")
    a("--test-steps", type=int, help=f"K_test ({d['test_steps']})")
    a("--eval-every", type=int, help=f"steps between evaluations ({d['eval_every']})")
    a("--eval-signals", type=int, help=f"test signals per evaluation ({d['eval_signals']})")
    a(
        "--snapshot-every",
        type=int,
        help="keep the meta-parameters at step 0 and every N steps in snapshots/ (0: none)",
    )
    harness.add_running_arguments(parser, PAPER, fill_later=True)
    a("--smoke", action="store_true", help="tiny sizes and two steps: checks that all runs")


POSITIVE = [
    "hidden",
    "layers",
    "outer_steps",
    "batch",
    "inner_steps",
    "resolution",
    "frames",
    "grid_stride",
    "test_steps",
    "eval_every",
    "eval_signals",
    "log_every",
    "ckpt_every",
    "threads",
    "bootstrap_chunk",
]


def settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Flags over the smoke values over the paper's defaults, validated."""
    s = {**PAPER, **(SMOKE if args.smoke else {})}
    s.update({k: v for k, v in vars(args).items() if k in PAPER and v is not None})
    for name in POSITIVE:
        if s[name] is not None and s[name] < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {s[name]}")
    for name in ("outer_lr", "clip", "inner_lr", "seconds", "bootstrap_lr", "audio_bound"):
        if not s[name] > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {s[name]}")
    if s["ratio"] is not None and not 0 < s["ratio"] <= 1:
        parser.error(f"--ratio must be in (0, 1], got {s['ratio']}")
    if s["bootstrap_steps"] < 0:
        parser.error(f"--bootstrap-steps must be >= 0, got {s['bootstrap_steps']}")
    if s["snapshot_every"] < 0:
        parser.error(f"--snapshot-every must be >= 0 (0: no snapshots), got {s['snapshot_every']}")
    if s["method"] == "reptile" and s["learned_lr"] != "none":
        parser.error(
            f"--method reptile takes no --learned-lr (got {s['learned_lr']}): its outer "
            "gradient theta_0 - theta_K does not reach the inner rates"
        )
    return resolve(s)


def main(argv: Sequence[str] | None = None) -> Dict[str, Any]:
    """Command line entry point; returns :func:`train`'s result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return train(settings_from(args, parser))


if __name__ == "__main__":
    main()
