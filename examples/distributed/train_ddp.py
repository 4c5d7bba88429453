"""Distributed GradNCP meta-training of a SIREN with DistributedDataParallel and torchrun.

Every process holds the same SIREN and meta-trains it on its own images. The model is wrapped in
``DistributedDataParallel`` and that wrapped model is what goes to :func:`ncp.meta_step`: ncp
unwraps it and averages the meta-gradients across processes during ``loss.backward()``, so every
rank steps its optimizer with the meta-gradient of all ranks' images together. On CPU the
processes talk over gloo; with CUDA each process takes the GPU ``LOCAL_RANK`` and uses NCCL.

Run from the repository root::

    torchrun --nproc_per_node=2 examples/distributed/train_ddp.py --outer-steps 20
    torchrun --nproc_per_node=2 examples/distributed/train_ddp.py --data text   # rendered Text
    torchrun --nproc_per_node=2 examples/distributed/train_ddp.py --unwrapped   # the misuse

``--unwrapped`` passes ``ddp_model.module`` to ``ncp.meta_step``, what one might write by habit
for a functional inner loop: each rank would then train on its own meta-gradient alone, with no
error from PyTorch. ncp refuses it with a ``ValueError`` naming ``DistributedDataParallel``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

if __package__ in (None, ""):  # run as a script (torchrun does): make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import ncp
from examples import harness
from examples.neural_fields.models import Siren
from examples.neural_fields.signals import grid_coordinates, image_context

DEFAULTS: Dict[str, Any] = dict(
    outer_steps=100,
    batch=2,  # images per rank and step
    resolution=32,
    hidden=64,
    layers=3,
    inner_steps=4,
    ratio=0.25,
    bootstrap_steps=3,
    outer_lr=1e-3,
    data="blobs",
    seed=0,
    ckpt_every=25,
)
# What a resumed run may change (see examples/harness.py); everything else must match.
MAY_CHANGE_ON_RESUME = ("outer_steps", "ckpt_every", "out", "restart", "unwrapped")


def blob_images(indices: Sequence[int], resolution: int, seed: int = 0) -> Tensor:
    """Simple generated images ``(len(indices), resolution, resolution, 3)`` in ``[0, 1]``.

    Image ``i`` is a few coloured Gaussian blobs on a plain background, drawn from a generator
    seeded with ``(seed, i)``: every rank can build any image of the data set by its index.
    """
    rows, cols = grid_coordinates(resolution, resolution).view(resolution, resolution, 2).unbind(-1)
    out = []
    for i in indices:
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(i))
        img = torch.rand(3, generator=g).expand(resolution, resolution, 3).clone()
        for _ in range(3):
            centre = torch.rand(2, generator=g) * 1.6 - 0.8
            width = 0.1 + 0.3 * torch.rand((), generator=g)
            colour = torch.rand(3, generator=g)
            bump = torch.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / width**2)
            img = img + bump[..., None] * (colour - img)
        out.append(img)
    return torch.stack(out)


def load_images(args: argparse.Namespace, indices: Sequence[int]) -> Tensor:
    if args.data == "text":
        from examples.neural_fields.text_data import TextImages  # needs Pillow and matplotlib

        text = TextImages("train", resolution=args.resolution, seed=args.seed, length=10**9)
        return text.batch(list(indices))
    return blob_images(indices, args.resolution, args.seed)


def rank_indices(step: int, rank: int, world: int, batch: int) -> range:
    """This rank's share of step ``step``'s global batch of ``world * batch`` images."""
    start = (step * world + rank) * batch
    return range(start, start + batch)


def setup() -> tuple[torch.device, int, int]:
    """Join the process group torchrun describes: NCCL on the GPU ``LOCAL_RANK`` when CUDA is
    available, gloo on CPU otherwise."""
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit(
            "train_ddp.py is launched by torchrun, which sets LOCAL_RANK, RANK and WORLD_SIZE: "
            "torchrun --nproc_per_node=2 examples/distributed/train_ddp.py"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device, dist.get_rank(), dist.get_world_size()


def parameters_in_sync(model: torch.nn.Module) -> bool:
    """Whether every rank holds the same parameters (their max and min agree everywhere)."""
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(torch.equal(high, low))


def settings_of(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's settings as saved in its checkpoint."""
    return {k: v for k, v in vars(args).items() if k != "out"}


def resume(
    args: argparse.Namespace,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    rank: int,
) -> Tuple[int, harness.MetricsLog | None]:
    """With ``--out``: load ``out/checkpoint.pt`` on every rank when it exists (unless
    ``--restart``) and return the step to start from and, on rank 0, the run's log. The
    images of a step depend on the step alone, so a resumed run sees what it would have seen."""
    if args.out is None:
        return 0, None
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, harness.CHECKPOINT)
    log = harness.MetricsLog(os.path.join(args.out, harness.LOG)) if rank == 0 else None
    start = 0
    if os.path.exists(path) and not args.restart:
        state = harness.load_checkpoint(path, device)
        harness.check_resume(
            state["settings"], settings_of(args), may_change=MAY_CHANGE_ON_RESUME, path=path
        )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        if log is not None:
            log.truncate(start)
    elif log is not None:
        log.clear()
    if rank == 0 and start:
        print(f"resumed from {path} at step {start}", flush=True)
    return start, log


def train(args: argparse.Namespace, device: torch.device, rank: int, world: int) -> List[float]:
    """Meta-train on this rank's images; returns the meta-loss over all ranks at every step."""
    torch.manual_seed(args.seed)  # DDP also broadcasts rank 0's parameters on wrapping
    model = Siren(out_features=3, hidden=args.hidden, layers=args.layers).to(device)
    ddp_model = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    optimizer = torch.optim.Adam(ddp_model.parameters(), lr=args.outer_lr)
    cfg = ncp.MetaConfig(
        inner_steps=args.inner_steps,
        pruner=ncp.ContextPruner(ratio=args.ratio),
        bootstrap=ncp.BootstrapMetaLoss(steps=args.bootstrap_steps),
    )
    if rank == 0:
        print(
            f"{world} processes ({dist.get_backend()}, {device.type}), "
            f"{args.batch} images per process and step",
            flush=True,
        )
    start, log = resume(args, model, optimizer, device, rank)
    history = []
    for step in range(start, args.outer_steps):
        images = load_images(args, rank_indices(step, rank, world, args.batch))
        x, y = image_context(images.to(device))
        meta_model = ddp_model.module if args.unwrapped else ddp_model
        out = ncp.meta_step(meta_model, (x, y), cfg)
        optimizer.zero_grad()
        out.loss.backward()  # every rank now holds the meta-gradient averaged over ranks
        optimizer.step()

        # For the log only: meta-loss and query MSE averaged over all ranks' images.
        logged = torch.stack([out.loss.detach(), out.query_loss.detach().mean()])
        dist.all_reduce(logged)
        meta_loss, mse = (logged / world).tolist()
        history.append(meta_loss)
        done = step + 1
        if rank == 0 and (step % max(1, args.outer_steps // 10) == 0 or done == args.outer_steps):
            print(
                f"step {done}/{args.outer_steps}  meta-loss {meta_loss:.4f}  "
                f"query PSNR {-10 * math.log10(mse):.2f} dB",
                flush=True,
            )
        if log is not None:  # rank 0 of a run with --out
            log.write({"step": done, "loss": meta_loss, "query_loss": mse})
            if done % args.ckpt_every == 0 or done == args.outer_steps:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                state.update(step=done, settings=settings_of(args))
                harness.save_checkpoint(state, os.path.join(args.out, harness.CHECKPOINT))
    in_sync = parameters_in_sync(model)
    if rank == 0:
        print(f"parameters identical on all ranks: {in_sync}", flush=True)
    if not in_sync:
        raise RuntimeError("the ranks' parameters diverged; their meta-gradients differed.")
    return history


def main(args: argparse.Namespace) -> List[float]:
    """Join the process group, train, and leave it cleanly."""
    device, rank, world = setup()
    try:
        return train(args, device, rank, world)
    finally:
        # DistributedDataParallel sits in reference cycles and holds the process group:
        # collect it first, so that destroy_process_group really shuts gloo's threads down
        # (left alive into interpreter exit, they can abort the process with SIGABRT).
        gc.collect()
        dist.destroy_process_group()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Distributed GradNCP meta-training of a SIREN (launch with torchrun)."
    )
    p.add_argument("--outer-steps", type=int, default=DEFAULTS["outer_steps"], help="outer steps")
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="images per process")
    p.add_argument("--resolution", type=int, default=DEFAULTS["resolution"])
    p.add_argument("--hidden", type=int, default=DEFAULTS["hidden"], help="SIREN width")
    p.add_argument("--layers", type=int, default=DEFAULTS["layers"], help="SIREN linear layers")
    p.add_argument("--inner-steps", type=int, default=DEFAULTS["inner_steps"])
    p.add_argument("--ratio", type=float, default=DEFAULTS["ratio"], help="context kept")
    p.add_argument("--bootstrap-steps", type=int, default=DEFAULTS["bootstrap_steps"])
    p.add_argument("--outer-lr", type=float, default=DEFAULTS["outer_lr"], help="outer Adam lr")
    p.add_argument(
        "--data",
        choices=("blobs", "text"),
        default=DEFAULTS["data"],
        help="generated blobs, or the rendered Text images (needs Pillow and matplotlib)",
    )
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--out", help="run folder: checkpoints (resumed when present), metrics.jsonl")
    p.add_argument("--ckpt-every", type=int, default=DEFAULTS["ckpt_every"])
    p.add_argument("--restart", action="store_true", help="ignore the checkpoint in --out")
    p.add_argument(
        "--unwrapped",
        action="store_true",
        help="pass ddp_model.module to ncp.meta_step (the misuse ncp refuses)",
    )
    args = p.parse_args(argv)
    for name in ("outer_steps", "batch", "hidden", "inner_steps", "bootstrap_steps", "ckpt_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.resolution < (16 if args.data == "text" else 2):
        p.error(f"--resolution is too small, got {args.resolution}")
    if args.layers < 2:
        p.error(f"--layers must be >= 2, got {args.layers}")
    if not 0 < args.ratio <= 1:
        p.error(f"--ratio must be in (0, 1], got {args.ratio}")
    if not (math.isfinite(args.outer_lr) and args.outer_lr > 0):
        p.error(f"--outer-lr must be > 0, got {args.outer_lr}")
    return args


if __name__ == "__main__":
    main(parse_args())
