"""Meta-learn a NeRF that adapts from one view (paper Table 4), then test it on unseen views.

Run from the repository root::

    python -m examples.nerf.train --method gradncp --out runs/nerf/gradncp_s0

A task is a scene. Its context set is ``--rays`` random rays of one view (the context view);
its query set is ``--query-rays`` random rays of the scene's other views, so the outer loss
measures how well the adapted NeRF renders views it has not seen (context and query are
disjoint, as in Tancik et al.'s Learnit and the paper's Table 4). Three methods at the same
memory:

- ``maml``: K=4 differentiable steps on all context rays;
- ``gradncp``: K=16 steps, each on the ``--ratio`` fraction of the context rays with the
  highest GradNCP score, plus the bootstrap correction (L full-context steps);
- ``random``: K=16 steps, each on a fresh random ``--ratio`` fraction, no bootstrap: the
  protocol of the paper's Learnit baseline (a random batch of 128 rays per inner step).

After meta-training, every validation and test scene is adapted on *all* pixels of its context
view for ``--test-steps`` steps (the same for every method) in three modes (``plain`` full-
context steps, ``rescaled`` as in the paper's Eq. 4, ``pruned`` steps on the kept rays), and
rendered from its other views. ``result.json`` holds the PSNR of each split and mode; the
headline mode of a run is the one that is best on the validation scenes.

The run folder is the one of the other examples (``examples/harness.py``): ``checkpoint.pt``
resumes a run exactly, ``metrics.jsonl`` logs it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from typing import Any, Dict, Sequence

import numpy as np
import torch
from torch import Tensor, nn

import ncp

from .. import harness
from ..neural_fields.metrics import psnr
from .model import TinyNeRF
from .scenes import SceneSet, make_scenes

METHODS = ("maml", "gradncp", "random")
MODES = ("plain", "rescaled", "pruned")
RESULT = "result.json"
# Defaults: the paper's NeRF setting (Appendix A.2, Tancik et al.'s Learnit) where it fits a
# CPU, in brackets where it does not.
DEFAULTS: Dict[str, Any] = {
    "method": "gradncp",
    "scenes": 256,  # procedural scenes for meta-training [ShapeNet Cars: 2,458 train]
    "val_scenes": 8,
    "test_scenes": 16,
    "views": 5,  # views of every scene; view 0 of a test scene is its context view [25]
    "resolution": 32,  # [128]
    "rays": 256,  # context rays drawn from the context view every outer step [512]
    "query_rays": 256,  # query rays drawn from the other views
    "hidden": 64,  # [256]
    "layers": 3,  # hidden layers [6 layers in all]
    "samples": 16,  # points per ray, evenly spaced, no jitter [Learnit: 128 stratified]
    "frequencies": 6,
    "outer_steps": 250,  # [Learnit: 100,000]
    "outer_lr": 2e-3,  # [Learnit: 5e-4]: 4x, for a few hundred steps
    "clip": 1.0,
    "batch": 4,
    "inner_lr": 0.5,  # Learnit's inner SGD rate
    "inner_steps": None,  # None: 4 for maml, 16 for gradncp and random (paper: 16)
    "ratio": 0.25,  # the paper's: 128 of 512 rays
    "bootstrap_steps": 5,
    "bootstrap_lr": 0.5,  # the inner rate (not given for NeRF in the paper)
    "bootstrap_weight": 100.0,
    "test_steps": 16,
    "data_seed": 0,
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "log_every": 10,
    "ckpt_every": 50,
    "out": os.path.join("runs", "nerf", "run"),
    "restart": False,
}
MAY_CHANGE_ON_RESUME = ("outer_steps", "test_steps", "device", "threads", "log_every")
MAY_CHANGE_ON_RESUME += ("ckpt_every", "out", "restart", "val_scenes", "test_scenes")


def resolve(settings: Dict[str, Any]) -> Dict[str, Any]:
    """``settings`` over :data:`DEFAULTS`, checked, with the method's default K filled in."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown NeRF settings {unknown}; the settings are {sorted(DEFAULTS)}.")
    s = {**DEFAULTS, **settings}
    if s["method"] not in METHODS:
        raise ValueError(f"`--method` must be one of {list(METHODS)}, got {s['method']!r}.")
    if s["inner_steps"] is None:
        s["inner_steps"] = 4 if s["method"] == "maml" else 16
    for key in ("scenes", "val_scenes", "test_scenes", "rays", "query_rays", "batch"):
        if not isinstance(s[key], int) or s[key] < 1:
            raise ValueError(f"`--{key.replace('_', '-')}` must be an int >= 1, got {s[key]!r}.")
    pixels = s["resolution"] ** 2
    if s["rays"] > pixels:
        raise ValueError(
            f"`--rays` must be at most the pixels of a view ({pixels} at --resolution "
            f"{s['resolution']}), got {s['rays']}; lower --rays or raise --resolution."
        )
    if s["query_rays"] > pixels * (s["views"] - 1):
        raise ValueError(
            f"`--query-rays` must be at most the pixels of the other views "
            f"({pixels * (s['views'] - 1)}), got {s['query_rays']}."
        )
    return s


def make_config(s: Dict[str, Any]) -> ncp.MetaConfig:
    """The method's :class:`ncp.MetaConfig`."""
    if s["method"] == "maml":
        return ncp.MetaConfig(
            inner_steps=s["inner_steps"], inner_lr=s["inner_lr"], pruner=None, bootstrap=None
        )
    if s["method"] == "random":
        pruner = ncp.ContextPruner(
            ratio=s["ratio"],
            score="random",
            generator=torch.Generator(s["device"]).manual_seed(s["seed"] + 2),
        )
        return ncp.MetaConfig(
            inner_steps=s["inner_steps"], inner_lr=s["inner_lr"], pruner=pruner, bootstrap=None
        )
    bootstrap = None  # --bootstrap-steps 0: no bootstrap term
    if s["bootstrap_steps"] > 0:
        bootstrap = ncp.BootstrapMetaLoss(
            steps=s["bootstrap_steps"], lr=s["bootstrap_lr"], weight=s["bootstrap_weight"]
        )
    return ncp.MetaConfig(
        inner_steps=s["inner_steps"],
        inner_lr=s["inner_lr"],
        pruner=ncp.ContextPruner(ratio=s["ratio"]),
        bootstrap=bootstrap,
    )


def load_run(run: str) -> tuple[TinyNeRF, Dict[str, Any]]:
    """The meta-learned model of the run folder ``run`` and its settings."""
    path = os.path.join(run, harness.CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`--run`={run!r} holds no {harness.CHECKPOINT}; train it first.")
    state = harness.load_checkpoint(path)
    s = state["settings"]
    model = TinyNeRF(s["hidden"], s["layers"], s["samples"], s["frequencies"])
    model.load_state_dict(state["model"])
    return model, s


def splits(s: Dict[str, Any]) -> Dict[str, SceneSet]:
    """Train, validation and test scenes: disjoint draws of one procedural family."""
    n = {"train": s["scenes"], "val": s["val_scenes"], "test": s["test_scenes"]}
    return {
        name: make_scenes(count, s["views"], s["resolution"], s["data_seed"] * 3 + i)
        for i, (name, count) in enumerate(n.items())
    }


def sample_batch(
    scenes: SceneSet, s: Dict[str, Any], g: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One outer step's tasks: context rays of a random view, query rays of the others."""
    b, v, p = s["batch"], scenes.views, scenes.resolution**2
    idx = torch.randint(scenes.scenes, (b,), generator=g)
    view = torch.randint(v, (b,), generator=g)
    others = (view[:, None] + 1 + torch.arange(v - 1)) % v  # (b, v - 1)
    pix = torch.rand(b, p, generator=g).argsort(1)[:, : s["rays"]]
    rows = torch.arange(b)[:, None]
    cx = scenes.rays[idx[:, None], view[:, None], pix]
    cy = scenes.colours[idx[:, None], view[:, None], pix]
    pool_x = scenes.rays[idx[:, None], others].flatten(1, 2)  # (b, (v - 1) * p, 6)
    pool_y = scenes.colours[idx[:, None], others].flatten(1, 2)
    q = torch.rand(b, pool_x.shape[1], generator=g).argsort(1)[:, : s["query_rays"]]
    return cx, cy, pool_x[rows, q], pool_y[rows, q]


def test_config(s: Dict[str, Any]) -> ncp.MetaConfig:
    """How every method adapts at test time: ``--test-steps`` SGD steps at ``--inner-lr``, the
    ``rescaled`` and ``pruned`` modes ranking rays by the GradNCP score at ``--ratio``."""
    return ncp.MetaConfig(
        inner_steps=s["test_steps"],
        inner_lr=s["inner_lr"],
        pruner=ncp.ContextPruner(ratio=s["ratio"]),
        bootstrap=None,
    )


def evaluate(model: nn.Module, s: Dict[str, Any], scenes: SceneSet) -> Dict[str, Dict[str, Any]]:
    """Adapt on every pixel of view 0 and render views 1.. of each scene, in every mode.

    Every method adapts the same way: ``--test-steps`` SGD steps at ``--inner-lr``; the
    ``rescaled`` and ``pruned`` modes rank rays by the GradNCP score at ``--ratio`` (also for
    MAML and the random method, which never scored rays in training). Returns ``{mode:
    {"psnr": mean over scenes, "per_scene": [...]}}``; a scene's PSNR is the mean over its
    unseen views.
    """
    cfg = test_config(s)
    x, y = scenes.rays[:, 0], scenes.colours[:, 0]
    out: Dict[str, Dict[str, Any]] = {}
    for mode, ncp_mode in zip(MODES, ("full", "rescaled", "pruned"), strict=True):
        params = ncp.adapt(model, x, y, cfg, mode=ncp_mode).params
        with torch.no_grad():
            per_view = [
                psnr(
                    ncp.forward(model, params, scenes.rays[:, v]).clamp(0, 1), scenes.colours[:, v]
                )
                for v in range(1, scenes.views)
            ]
        values = torch.stack(per_view).mean(0).tolist()
        out[mode] = {"psnr": float(np.mean(values)), "per_scene": values}
    return out


def train(settings: Dict[str, Any], *, stop_after: int | None = None) -> Dict[str, Any]:
    """Meta-train (resuming from ``out/checkpoint.pt``), then evaluate into ``result.json``.

    ``stop_after`` leaves after that many outer steps of this call, with a checkpoint (a
    simulated interruption, for tests). Returns the result ({} when stopped early).
    """
    s = resolve(settings)
    torch.set_num_threads(s["threads"])
    device = torch.device(s["device"])
    data = splits(s)
    torch.manual_seed(s["seed"])
    random.seed(s["seed"])
    np.random.seed(s["seed"])
    model = TinyNeRF(s["hidden"], s["layers"], s["samples"], s["frequencies"]).to(device)
    cfg = make_config(s)
    opt = torch.optim.Adam(model.parameters(), lr=s["outer_lr"])
    sampler = torch.Generator().manual_seed(s["seed"] + 1)
    generators = {"sampler": sampler, "pruner": cfg.pruner.generator if cfg.pruner else None}
    step, log = harness.resume(
        s["out"],
        s,
        may_change=MAY_CHANGE_ON_RESUME,
        states={"model": model, "optimizer": opt},
        generators=generators,
        device=device,
        restart=s["restart"],
    )
    if step == 0:
        log.write({"step": 0, "event": "start", "settings": s})
    ckpt_path = os.path.join(s["out"], harness.CHECKPOINT)

    def save() -> None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
        state |= {"rng": harness.rng_state(device, **generators), "settings": s}
        harness.save_checkpoint(state, ckpt_path)

    total = s["outer_steps"]
    end = total if stop_after is None else min(total, step + stop_after)
    bar = harness.progress(total, initial=step, desc=f"nerf {s['method']}")
    start = time.perf_counter()
    while step < end:
        batch = tuple(t.to(device) for t in sample_batch(data["train"], s, sampler))
        opt.zero_grad(set_to_none=True)
        if step == 0:
            with ncp.MemoryMeter(device if device.type == "cuda" else None) as meter:
                out = ncp.meta_step(model, batch, cfg)
                out.loss.backward()
            log.write({"step": 0, "event": "memory", "peak_saved_bytes": meter.peak_saved_bytes})
        else:
            out = ncp.meta_step(model, batch, cfg)
            out.loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), s["clip"])
        opt.step()
        step += 1
        bar.update(1)
        if step % s["log_every"] == 0 or step == end:
            q = out.query_loss.mean().item()
            rec = {"step": step, "loss": out.loss.item(), "query_loss": q}
            rec |= {"grad_norm": grad_norm.item(), "seconds": time.perf_counter() - start}
            log.write(rec)
            bar.set_postfix(query_psnr=f"{-10 * math.log10(max(q, 1e-12)):.2f}")
        if step % s["ckpt_every"] == 0 or step == end:
            save()
    bar.close()
    if step < total:
        return {}
    result: Dict[str, Any] = {"settings": s, "outer_steps": step}
    for split in ("val", "test"):
        result[split] = evaluate(model, s, data[split])
    result["headline"] = max(MODES, key=lambda m: result["val"][m]["psnr"])
    with open(os.path.join(s["out"], RESULT), "w") as f:
        json.dump(result, f, indent=1)
    return result


def parse(argv: Sequence[str] | None = None) -> Dict[str, Any]:
    """The flags of :func:`train` as a settings dict."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    running = {"out", "seed", "device", "threads", "log_every", "ckpt_every", "restart"}
    for key, value in DEFAULTS.items():
        if key in running:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "method":
            p.add_argument(flag, choices=METHODS, default=value)
        elif key == "inner_steps":
            p.add_argument(flag, type=int, default=None, help="4 for maml, 16 otherwise")
        else:
            p.add_argument(flag, type=type(value), default=value)
    harness.add_running_arguments(p, DEFAULTS)
    return vars(p.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> None:
    result = train(parse(argv))
    if result:
        line = {
            split: {m: round(result[split][m]["psnr"], 2) for m in MODES}
            for split in ("val", "test")
        }
        print(json.dumps({"headline": result["headline"], **line}), file=sys.stdout)


if __name__ == "__main__":
    main()
