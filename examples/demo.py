"""ncp's main demo: MAML vs GradNCP at equal memory, meta-trained on CPU in a few minutes.

Both methods start from the same SIREN initialisation and see the same batches of the Text data
set (random strings in random fonts and colours, rendered on the fly: no download). MAML adapts
for K=4 steps on the full context; GradNCP for K=16 steps on the 25 % of points with the largest
last-layer gradient norm, plus the bootstrap term (L=5), which costs about the same memory.
Then both are adapted to held-out images for 16 test-time steps on the full context, and the
script prints PSNR, the peak memory saved for backward by one meta-step, and seconds per outer
step, and writes a figure.

The scale is tiny next to the paper's (SIREN 5x256 on 178x178 images for 150,000 outer steps at
lr 1e-5): expect the ranking, not the paper's PSNRs.

Run from the repository root::

    python examples/demo.py                 # about 3 minutes on 2 CPU cores
    python examples/demo.py --smoke         # a few seconds: checks that everything runs
    python examples/demo.py --outer-steps 500 --resolution 64 --out runs/longer
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Any, Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make `examples` and `ncp` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ncp
from examples.neural_fields.metrics import psnr
from examples.neural_fields.models import Siren
from examples.neural_fields.signals import image_context
from examples.neural_fields.text_data import TextImages

DEFAULTS: Dict[str, Any] = dict(
    outer_steps=150,
    resolution=64,
    batch=4,
    # The paper's 1e-5 barely moves the initialisation in 150 steps; a sweep at 100 steps
    # (1e-4, 3e-4, 1e-3, 3e-3) gave GradNCP its best test PSNR from 1e-3 on (MAML's was flat).
    outer_lr=1e-3,
    clip=1.0,
    hidden=128,
    layers=3,
    test_images=16,
    test_steps=16,
    seed=0,
    out=os.path.join("runs", "demo"),
)
# A configuration that runs end to end in a few seconds (for tests).
SMOKE: Dict[str, Any] = dict(
    outer_steps=2, resolution=16, batch=2, hidden=32, layers=3, test_images=2, test_steps=4
)


def method_configs() -> Dict[str, ncp.MetaConfig]:
    """The two methods compared, at about equal memory (paper Sec. 3, CelebA ablations)."""
    return {
        "MAML": ncp.MetaConfig(inner_steps=4, pruner=None, bootstrap=None),
        "GradNCP": ncp.MetaConfig(),  # K=16, ratio 0.25, bootstrap L=5
    }


def progress(iterable: Sequence[int], desc: str) -> Iterable[int]:
    """A tqdm progress bar when tqdm is installed, else a line every ~10 % of the steps."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _print_progress(iterable, desc)
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def _print_progress(iterable: Sequence[int], desc: str) -> Iterator[int]:
    every = max(1, len(iterable) // 10)
    for i, item in enumerate(iterable):
        if i % every == 0 or i == len(iterable) - 1:
            print(f"  {desc}: step {i + 1}/{len(iterable)}", flush=True)
        yield item


def meta_train(
    model: nn.Module,
    cfg: ncp.MetaConfig,
    data: TextImages,
    *,
    steps: int,
    batch: int,
    lr: float,
    clip: float,
    desc: str,
) -> Dict[str, Any]:
    """Meta-train ``model`` in place: a plain Adam loop around :func:`ncp.meta_step`.

    Step ``t`` uses images ``t * batch ... (t + 1) * batch - 1`` of ``data``, so two calls with
    the same arguments see the same batches. The first step runs inside a
    :class:`ncp.MemoryMeter` and is left out of the timing (unless it is the only step).

    Returns:
        ``peak_saved_bytes`` of one meta-step (forward and backward), ``seconds_per_step``
        ``losses`` (the outer loss of each step) and ``query_losses`` (its reconstruction
        part, mean over tasks: comparable between methods, unlike ``losses``, which includes
        GradNCP's bootstrap term).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    load_start = _load_average()
    losses: List[float] = []
    query_losses: List[float] = []
    peak = 0
    timed, first = 0.0, 0.0
    for step in progress(range(steps), desc):
        start = time.perf_counter()
        indices = [(step * batch + i) % len(data) for i in range(batch)]
        x, y = image_context(data.batch(indices))
        opt.zero_grad(set_to_none=True)
        if step == 0:
            with ncp.MemoryMeter() as meter:
                out = ncp.meta_step(model, (x, y), cfg)
                out.loss.backward()
            peak = meter.peak_saved_bytes
        else:
            out = ncp.meta_step(model, (x, y), cfg)
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(out.loss.item())
        query_losses.append(out.query_loss.mean().item())
        if step > 0:
            timed += time.perf_counter() - start
        else:
            first = time.perf_counter() - start
    seconds = timed / (steps - 1) if steps > 1 else first
    return {
        "peak_saved_bytes": peak,
        "seconds_per_step": seconds,
        "load_average": max(load_start, _load_average()),
        "losses": losses,
        "query_losses": query_losses,
    }


def _load_average() -> float:
    """The 1-minute load average (0 where the OS does not report one)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def free_cores() -> int:
    """Cores not busy when the demo starts: the CPU count minus the 1-minute load average
    (rounded), at least 1. The demo's default thread count: a thread pool larger than the free
    cores slows a GradNCP step down 2.5 times more than a MAML step, while one thread per free
    core slows neither (docs/benchmarks.md, "Contention")."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, cores - round(_load_average())))


def busy_note(results: Dict[str, Any]) -> str | None:
    """A warning when other processes shared the CPU while a method trained: the step times
    are then not comparable (a GradNCP step, made of more and smaller operations, slows down
    more than a MAML step when its threads wait for a core; docs/benchmarks.md)."""
    cores = os.cpu_count() or 1
    own = torch.get_num_threads()
    loads = {name: m["load_average"] for name, m in results["methods"].items()}
    if max(loads.values()) <= cores + 0.5:  # every core busy, and more work waiting
        return None
    shown = ", ".join(f"{name} {v:.1f}" for name, v in loads.items())
    return (
        f"note:    the CPU was shared while training (1-min load average {shown}; {cores} "
        f"cores, {own} threads here): the s/step column is not a fair comparison. Rerun on an "
        "idle machine, or with --threads 1, for comparable timings."
    )


def reconstruct(
    model: nn.Module,
    cfg: ncp.MetaConfig,
    images: Tensor,
    *,
    steps: int,
    mode: str = "full",
    chunk: int = 8,
) -> Tensor:
    """Adapt to each image for ``steps`` full-context steps; return the images ``(N, H, W, 3)``
    clamped to ``[0, 1]``."""
    out = []
    for part in images.split(chunk):
        x, y = image_context(part)
        params = ncp.adapt(model, x, y, cfg, steps=steps, mode=mode).params
        with torch.no_grad():
            pred = ncp.forward(model, params, x)
        out.append(pred.clamp(0, 1).reshape(part.shape))
    return torch.cat(out)


def kept_points(model: nn.Module, cfg: ncp.MetaConfig, images: Tensor) -> Tensor:
    """The context indices GradNCP keeps at each inner step for ``images``: ``(K, N, k)``.

    ``ncp.adapt(..., mode="pruned")`` replays the meta-training inner loop (pruned steps)
    without a graph and records the points kept at every step.
    """
    adapted = ncp.adapt(model, *image_context(images), cfg, mode="pruned")
    assert adapted.kept_indices is not None
    return adapted.kept_indices


def make_figure(
    path: str,
    images: Tensor,
    recon: Dict[str, Tensor],
    kept: Tensor,
    show_steps: Sequence[int],
    psnrs: Dict[str, Tensor],
) -> None:
    """Write a PNG: one row per image; ground truth, reconstructions, kept points at
    ``show_steps`` (red dots)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    n, _, w, _ = images.shape
    cols = 1 + len(recon) + len(show_steps)
    fig = Figure(figsize=(1.9 * cols, 2.0 * n + 0.2), dpi=100, layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    for r in range(n):
        panels: List[Tuple[str, Tensor, Tensor | None]] = [("ground truth", images[r], None)]
        panels += [
            (f"{name}\n{psnrs[name][r]:.1f} dB", rec[r], None) for name, rec in recon.items()
        ]
        panels += [(f"GradNCP kept, step {k}", images[r], kept[k, r]) for k in show_steps]
        for c, (title, img, idx) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img.numpy(), alpha=1.0 if idx is None else 0.45, interpolation="nearest")
            if idx is not None:
                ax.scatter((idx % w).numpy(), (idx // w).numpy(), s=0.6, c="red", marker="s", lw=0)
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    fig.savefig(path)


def main(argv: Sequence[str] | None = None) -> Dict[str, Any]:
    """Run the demo; ``argv`` as on the command line. Returns the results as a dict. The torch
    thread count is set for the run and restored afterwards."""
    args = parse_args(argv)
    settings = {**DEFAULTS, **(SMOKE if args.smoke else {})}
    settings.update({k: v for k, v in vars(args).items() if v is not None and k != "smoke"})
    before = torch.get_num_threads()
    threads = settings.get("threads") or min(before, free_cores())
    torch.set_num_threads(threads)
    try:
        return _run(settings, threads)
    finally:
        torch.set_num_threads(before)


def _run(settings: Dict[str, Any], threads: int) -> Dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(settings["seed"])
    init = Siren(hidden=settings["hidden"], layers=settings["layers"])
    res = settings["resolution"]
    train = TextImages("train", resolution=res, seed=settings["seed"], length=10**6)
    test = TextImages("test", resolution=res, seed=settings["seed"], length=settings["test_images"])
    test_images = test.batch(range(len(test)))
    n_params = sum(p.numel() for p in init.parameters())
    configs = method_configs()

    print(
        f"ncp demo: MAML vs GradNCP at equal memory on Text {res}x{res} "
        f"({len(train.fonts)} fonts, rendered on the fly)\n"
        f"model:   SIREN, {settings['layers']} linear layers of width {settings['hidden']}, "
        f"{n_params:,} parameters (paper: 5 x 256 on 178x178)\n"
        f"outer:   Adam lr {settings['outer_lr']:g}, grad clip {settings['clip']:g}, batch "
        f"{settings['batch']}, {settings['outer_steps']} steps per method "
        f"(paper: lr 1e-5, 150,000 steps; a larger lr suits this tiny budget)\n"
        f"test:    {len(test)} held-out images, {settings['test_steps']} full-context steps\n"
        f"threads: {threads}"
        + ("" if settings.get("threads") else " (the cores free at start; --threads to set)"),
        flush=True,
    )
    models: Dict[str, nn.Module] = {}
    results: Dict[str, Any] = {"settings": settings, "n_params": n_params, "methods": {}}
    for name, cfg in configs.items():
        model = copy.deepcopy(init)
        train_out = meta_train(
            model,
            cfg,
            train,
            steps=settings["outer_steps"],
            batch=settings["batch"],
            lr=settings["outer_lr"],
            clip=settings["clip"],
            desc=name,
        )
        models[name] = model
        results["methods"][name] = {
            "inner_steps": cfg.inner_steps,
            "ratio": 1.0 if cfg.pruner is None else cfg.pruner.ratio,
            **train_out,
        }

    k_test = settings["test_steps"]
    recon = {
        "no meta-learning": reconstruct(init, configs["MAML"], test_images, steps=k_test),
        "MAML": reconstruct(models["MAML"], configs["MAML"], test_images, steps=k_test),
        "GradNCP": reconstruct(models["GradNCP"], configs["GradNCP"], test_images, steps=k_test),
        "GradNCP + rescale": reconstruct(
            models["GradNCP"],
            configs["GradNCP"],
            test_images,
            steps=k_test,
            mode="rescaled",
        ),
    }
    psnrs = {name: psnr(rec, test_images) for name, rec in recon.items()}
    results["psnr"] = {name: p.mean().item() for name, p in psnrs.items()}

    os.makedirs(settings["out"], exist_ok=True)
    figure = os.path.join(settings["out"], "demo.png")
    shown = test_images[:3]
    kept = kept_points(models["GradNCP"], configs["GradNCP"], shown)
    K = kept.shape[0]
    show_steps = sorted({0, K // 2, K - 1})
    make_figure(
        figure,
        shown,
        {k: recon[k][:3] for k in ("MAML", "GradNCP + rescale")},
        kept,
        show_steps,
        psnrs,
    )
    results["figure"] = figure
    results["total_seconds"] = time.perf_counter() - t0
    with open(os.path.join(settings["out"], "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    print(format_table(results, k_test))
    note = busy_note(results)
    if note is not None:
        print(note)
    print(f"figure:  {figure}\ntotal:   {results['total_seconds']:.0f} s")
    return results


def format_table(results: Dict[str, Any], k_test: int) -> str:
    """The printed summary."""
    methods = results["methods"]
    head = f"{'method':<28}{'K':>3}{'ratio':>7}{'saved MB':>10}{'s/step':>8}{f'PSNR@{k_test}':>9}"
    rows = [head, "-" * len(head)]
    specs = [
        ("no meta-learning (same init)", None, "no meta-learning"),
        ("MAML", "MAML", "MAML"),
        ("GradNCP", "GradNCP", "GradNCP"),
        ("GradNCP + grad rescaling", "GradNCP", "GradNCP + rescale"),
    ]
    for label, method, key in specs:
        if method is None:
            cols = f"{'-':>3}{'-':>7}{'-':>10}{'-':>8}"
        else:
            m = methods[method]
            mb = m["peak_saved_bytes"] / 2**20
            sec = m["seconds_per_step"]
            cols = f"{m['inner_steps']:>3}{m['ratio']:>7.2f}{mb:>10.1f}{sec:>8.2f}"
        rows.append(f"{label:<28}{cols}{results['psnr'][key]:>9.2f}")
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--outer-steps", type=int, help=f"outer steps per method ({DEFAULTS['outer_steps']})"
    )
    parser.add_argument("--resolution", type=int, help=f"image side ({DEFAULTS['resolution']})")
    parser.add_argument("--batch", type=int, help=f"images per outer step ({DEFAULTS['batch']})")
    parser.add_argument(
        "--outer-lr", type=float, help=f"outer Adam learning rate ({DEFAULTS['outer_lr']:g})"
    )
    parser.add_argument("--hidden", type=int, help=f"SIREN width ({DEFAULTS['hidden']})")
    parser.add_argument("--layers", type=int, help=f"SIREN linear layers ({DEFAULTS['layers']})")
    parser.add_argument(
        "--test-images", type=int, help=f"held-out images ({DEFAULTS['test_images']})"
    )
    parser.add_argument("--seed", type=int, help=f"seed of the model and data ({DEFAULTS['seed']})")
    parser.add_argument("--out", help=f"output folder ({DEFAULTS['out']})")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (the cores free at start, at most torch's default)",
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny run of a few seconds")
    args = parser.parse_args(argv)
    for name in (
        "outer_steps",
        "resolution",
        "batch",
        "hidden",
        "layers",
        "test_images",
        "threads",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.outer_lr is not None and not args.outer_lr > 0:
        parser.error(f"--outer-lr must be > 0, got {args.outer_lr}")
    return args


if __name__ == "__main__":
    main()
