"""Evaluate a meta-learned initialisation: PSNR, SSIM (LPIPS when available) after ``K_test``
test-time steps on held-out signals: full-context steps with and without test-time gradient
rescaling, and steps on the pruned context itself (the paper's Figure 11), with PSNR after every
step up to a longer horizon (the paper's Figure 5b).

Run from the repository root on a folder written by ``train``::

    python -m examples.neural_fields.evaluate --run runs/nf/text --test-steps 16 --horizon 64

Rescaling (paper Eq. 4) and pruned-context adaptation need a pruner: a GradNCP run uses its
own; a MAML run uses ``ContextPruner(ratio=--rescale-ratio)`` (default the data set's paper ratio;
the control the paper lacks).
``--init random`` evaluates the run's initialisation before meta-training instead.
``--on DATA`` adapts the run's initialisation to another data set's test signals (cross-domain
adaptation, the paper's Table 10); a video run adapts to images as one-frame clips at ``t = 0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make `examples` and `ncp` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import ncp
from examples import harness
from examples.neural_fields import datasets, train
from examples.neural_fields.metrics import lpips, lpips_status, psnr, ssim


def cross_domain(source: datasets.SignalSet, s: Dict[str, Any], on: str) -> datasets.SignalSet:
    """The data set ``on`` at the run's sizes, shaped for the run's model (trained on
    ``source``): images become one-frame clips for a video model; any other mismatch of
    input or output size is an error."""
    target = train.load_data({**s, "data": on, "root": None, "variable": None})
    if source.kind == "video" and not source.frame_points and target.kind == "image":
        target = dataclasses.replace(target, frame_time=0.0)
    if (target.in_features, target.out_features) != (source.in_features, source.out_features):
        raise ValueError(
            f"`on`={on!r} has {target.in_features}-D points with {target.out_features} values, "
            f"but the run was trained on {source.name!r} ({source.in_features}-D points, "
            f"{source.out_features} values); adapt it to a data set of the same kind (a video "
            "run also adapts to images)."
        )
    return target


def load_run(
    run: str,
    *,
    device: str = "cpu",
    init: str = "trained",
    on: str | None = None,
    at_step: int | None = None,
) -> Dict[str, Any]:
    """Model, config, data and settings of the run folder ``run``.

    Args:
        run: folder holding ``checkpoint.pt``.
        device: where to put the model.
        init: ``"trained"`` (the checkpoint) or ``"random"`` (the same seed's initialisation,
            never meta-trained).
        on: another data set (a name of ``datasets.STANDINS``) whose test signals to adapt to
            instead of the run's own (:func:`cross_domain`).
        at_step: with ``init="trained"``, the meta-parameters of the snapshot taken after this
            many outer steps (a run trained with ``--snapshot-every``) instead of the last
            checkpoint.
    """
    path = os.path.join(run, train.CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`run`={run!r} holds no {train.CHECKPOINT}; train it first.")
    if init not in ("trained", "random"):
        raise ValueError(f"`init` must be 'trained' or 'random', got {init!r}.")
    ckpt = harness.load_checkpoint(path, device)
    if at_step is not None:
        if init != "trained":
            raise ValueError(f"`at_step`={at_step} reads a trained snapshot; `init` is {init!r}.")
        steps = train.snapshot_steps(run)
        if at_step not in steps:
            raise ValueError(
                f"`at_step`={at_step}: {run} has snapshots at steps {steps or 'none'}; train "
                "with --snapshot-every to keep them, or pick one of those steps."
            )
        snap = harness.load_checkpoint(train.snapshot_path(run, at_step), device)
        ckpt = {**ckpt, "model": snap["model"], "learned_lr": snap["learned_lr"], "step": at_step}
    s = {**ckpt["settings"], "device": device}
    signals = train.load_data(s)
    torch.manual_seed(s["seed"])
    model = train.make_model(s, signals).to(device)
    cfg = train.make_config(s)
    rates = train.make_learned_lr(s, model, cfg)
    if on is not None and on != s["data"]:
        signals = cross_domain(signals, s, on)
    if init == "trained":
        model.load_state_dict(ckpt["model"])
        if rates is not None:
            rates.load_state_dict(ckpt["learned_lr"])
    return {
        "learned_lr": rates,
        "model": model,
        "config": train.make_config(s),
        "signals": signals,
        "settings": s,
        "step": ckpt["step"] if init == "trained" else 0,
    }


def rescale_config(
    cfg: ncp.MetaConfig, ratio: float, *, score_dtype: torch.dtype | None = None
) -> ncp.MetaConfig:
    """``cfg`` with a GradNCP pruner if it has none (MAML), so that rescaling is defined; that
    pruner scores in ``score_dtype`` (default the parameters' dtype)."""
    if cfg.pruner is not None:
        return cfg
    return ncp.MetaConfig(
        inner_steps=cfg.inner_steps,
        inner_lr=cfg.inner_lr,
        pruner=ncp.ContextPruner(ratio=ratio, score_dtype=score_dtype),
        bootstrap=None,
    )


def _clamp(pred: Tensor, signals: datasets.SignalSet) -> Tensor:
    low = -1.0 if signals.kind == "audio" else 0.0
    return pred.clamp(low, low + signals.data_range)


def adapt_curve(
    model: nn.Module,
    cfg: ncp.MetaConfig,
    signals: datasets.SignalSet,
    test: Tensor,
    *,
    checkpoints: Sequence[int],
    lr: float | None = None,
    mode: str = "full",
    learned_lr: ncp.LearnedLR | None = None,
    chunk: int = 8,
    ssim_at: int | None = None,
) -> Dict[int, Dict[str, float]]:
    """Adapt with :func:`ncp.adapt` in ``mode`` (``"full"``, ``"rescaled"`` or ``"pruned"``)
    and measure on the full context after each step count in ``checkpoints``.

    With fixed rates, each count continues from the previous one. With ``learned_lr`` each count
    is adapted from the start, since a call to :func:`ncp.adapt` starts the learned schedule at
    its first step.

    Returns:
        ``{steps: {"psnr": mean dB}}``, with ``"ssim"`` too at ``ssim_at`` steps for images
        and video.
    """
    wanted = sorted(set(checkpoints))
    device = next(model.parameters()).device
    sums: Dict[int, Dict[str, List[Tensor]]] = {k: {"psnr": [], "ssim": []} for k in wanted}
    for part in test.split(chunk):
        part = part.to(device)
        x, y = signals.context(part)
        params: Dict[str, Tensor] | None = None
        done = 0
        for k in wanted:
            if learned_lr is not None and k > 0:
                params = ncp.adapt(
                    model, x, y, cfg, steps=k, mode=mode, learned_lr=learned_lr
                ).params
            elif k > done:
                params = ncp.adapt(
                    model,
                    x,
                    y,
                    cfg,
                    steps=k - done,
                    lr=lr,
                    mode=mode,
                    params=params,
                ).params
                done = k
            with torch.no_grad():
                pred = _clamp(
                    ncp.forward(model, params, x) if params is not None else _initial(model, x),
                    signals,
                )
            sums[k]["psnr"].append(psnr(pred, y, signals.data_range))
            if k == ssim_at and signals.kind in ("image", "video"):
                sums[k]["ssim"].append(ssim(pred.reshape(part.shape), part, signals.data_range))
    return {k: {m: torch.cat(v).mean().item() for m, v in d.items() if v} for k, d in sums.items()}


def _initial(model: nn.Module, x: Tensor) -> Tensor:
    return torch.stack([model(xi) for xi in x])


def evaluate(
    run: str,
    *,
    test_steps: int | None = None,
    horizon: int | None = None,
    test_lrs: Sequence[float] = (),
    rescale_ratio: float | None = None,
    signals_limit: int | None = None,
    init: str = "trained",
    device: str = "cpu",
    on: str | None = None,
    score_dtype: str | None = None,
) -> Dict[str, Any]:
    """The numbers of one run; also written to ``run/eval_<init>.json``
    (``run/eval_<init>_on_<on>.json`` for another data set, ``..._score_<dtype>.json`` with
    ``score_dtype``).

    Args:
        run: a folder written by ``train``.
        test_steps: K_test; default the run's ``test_steps``.
        horizon: also report PSNR at every step up to this many (Figure 5b); default
            ``4 * K_test``.
        test_lrs: further test-time learning rates to try (with and without rescaling).
        rescale_ratio: pruner ratio defining the rescaling and pruned context of a MAML run;
            default the data set's paper ratio (:func:`train.paper_ratio`).
        signals_limit: evaluate on the first this many test signals (default all).
        init: ``"trained"`` or ``"random"`` (see :func:`load_run`).
        on: adapt to this data set's test signals instead (see :func:`load_run`).
        score_dtype: rank the points of the rescaled and pruned modes with the scoring pass in
            this dtype (a name of ``train.SCORE_DTYPES``) instead of the run's own: a run
            trained with float32 scoring evaluated with bfloat16 ranking, or the reverse.
    """
    if score_dtype is not None and score_dtype not in train.SCORE_DTYPES:
        raise ValueError(
            f"`score_dtype` must be one of {sorted(train.SCORE_DTYPES)}, got {score_dtype!r}."
        )
    r = load_run(run, device=device, init=init, on=on)
    model, cfg, signals, s = r["model"], r["config"], r["signals"], r["settings"]
    if score_dtype is not None:
        s = {**s, "score_dtype": score_dtype}
        cfg = train.make_config(s)
    k_test = test_steps or s["test_steps"]
    horizon = horizon or 4 * k_test
    test = signals.test if signals_limit is None else signals.test[:signals_limit]
    if rescale_ratio is None:
        rescale_ratio = train.paper_ratio(s["data"])
    rcfg = rescale_config(
        cfg, rescale_ratio, score_dtype=train.SCORE_DTYPES[s.get("score_dtype", "float32")]
    )
    result: Dict[str, Any] = {
        "run": run,
        "score_dtype": s.get("score_dtype", "float32"),
        "init": init,
        "trained_on": s["data"],
        "outer_steps": r["step"],
        "data": signals.describe(),
        "method": s["method"],
        "inner_steps": cfg.inner_steps,
        "test_steps": k_test,
        "horizon": horizon,
        "test_signals": len(test),
        "pruner_ratio": rcfg.pruner.ratio,
        "lpips": lpips_status(),
        "variants": {},
    }
    rates = r["learned_lr"]
    lrs: List[float | None] = [None] if rates is not None else [cfg.inner_lr]
    lrs += [lr for lr in test_lrs if lr != cfg.inner_lr or rates is not None]
    if rates is None:
        points = sorted({0, k_test, *range(1, horizon + 1)})
    else:  # each point adapted from the start: a few points only
        points = sorted(p for p in {0, 4, k_test, 2 * k_test, horizon} if p <= horizon)
    for lr in lrs:
        main_lr = lr in (None, cfg.inner_lr)
        # full context, full context rescaled, and (at the run's own rate) the pruned context
        for mode in ("", " +rescale", " pruned") if main_lr else ("", " +rescale"):
            name = ("learned lr" if lr is None else f"lr={lr:g}") + mode
            curve = adapt_curve(
                model,
                cfg if mode == "" else rcfg,
                signals,
                test,
                checkpoints=points if main_lr else [k_test],
                lr=lr,
                mode={"": "full", " +rescale": "rescaled", " pruned": "pruned"}[mode],
                learned_lr=rates if lr is None else None,
                ssim_at=k_test,
            )
            at_k = curve[k_test]
            result["variants"][name] = {
                "lr": lr,
                "rescale": mode == " +rescale",
                "pruned": mode == " pruned",
                **at_k,
                "curve": {str(k): v["psnr"] for k, v in curve.items()},
            }
    if result["lpips"] == "available" and signals.kind == "image":
        x, y = signals.context(test.to(device))
        params = ncp.adapt(model, x, y, cfg, steps=k_test, learned_lr=rates).params
        with torch.no_grad():
            pred = _clamp(ncp.forward(model, params, x), signals).reshape(test.shape)
        result["variants"][next(iter(result["variants"]))]["lpips"] = (
            lpips(pred, test.to(device)).mean().item()
        )
    with open(os.path.join(run, result_name(init, on, score_dtype)), "w") as f:
        json.dump(result, f, indent=1)
    return result


def result_name(
    init: str = "trained", on: str | None = None, score_dtype: str | None = None
) -> str:
    """The file :func:`evaluate` writes in the run folder."""
    name = f"eval_{init}" + (f"_on_{on}" if on is not None else "")
    return name + (f"_score_{score_dtype}" if score_dtype is not None else "") + ".json"


def format_result(result: Dict[str, Any]) -> str:
    """The printed summary of :func:`evaluate`."""
    k, h = result["test_steps"], result["horizon"]
    lines = [
        f"{result['run']} ({result['init']}, {result['outer_steps']} outer steps"
        + (f" on {result['trained_on']}" if "trained_on" in result else "")
        + f"): adapted to {result['data']}, {result['method']} K={result['inner_steps']}, "
        f"{result['test_signals']} test signals",
        f"{'variant':<26}{f'PSNR@{k}':>9}{'SSIM':>8}{f'PSNR@{h}':>10}",
    ]
    for name, v in result["variants"].items():
        ssim_ = f"{v['ssim']:.3f}" if "ssim" in v else "-"
        far = v["curve"].get(str(h))
        far_ = f"{far:.2f}" if far is not None else "-"
        lines.append(f"{name:<26}{v['psnr']:>9.2f}{ssim_:>8}{far_:>10}")
    lines.append(result["lpips"] if result["lpips"] != "available" else "LPIPS: see JSON")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Dict[str, Any]:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="folder written by train")
    parser.add_argument("--test-steps", type=int, help="K_test (the run's --test-steps)")
    parser.add_argument("--horizon", type=int, help="PSNR curve up to this step (4 K_test)")
    parser.add_argument("--test-lrs", type=float, nargs="*", default=(), help="more test lrs")
    parser.add_argument(
        "--rescale-ratio", type=float, help="MAML's pruner ratio (the data set's paper ratio)"
    )
    parser.add_argument("--signals", type=int, help="evaluate on the first N test signals")
    parser.add_argument("--init", choices=("trained", "random"), default="trained")
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")
    parser.add_argument(
        "--on",
        choices=datasets.STANDINS,
        help="adapt to this stand-in's test signals instead (cross-domain, Table 10)",
    )
    parser.add_argument(
        "--score-dtype",
        choices=tuple(train.SCORE_DTYPES),
        help="rank the points of the rescaled and pruned modes in this dtype (the run's own); "
        "the result goes to eval_<init>_score_<dtype>.json",
    )
    args = parser.parse_args(argv)
    for name in ("test_steps", "horizon", "signals"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.rescale_ratio is not None and not 0 < args.rescale_ratio <= 1:
        parser.error(f"--rescale-ratio must be in (0, 1], got {args.rescale_ratio}")
    result = evaluate(
        args.run,
        test_steps=args.test_steps,
        horizon=args.horizon,
        test_lrs=args.test_lrs,
        rescale_ratio=args.rescale_ratio,
        signals_limit=args.signals,
        init=args.init,
        device=args.device,
        on=args.on,
        score_dtype=args.score_dtype,
    )
    print(format_result(result))
    return result


if __name__ == "__main__":
    main()
