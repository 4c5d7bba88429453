"""What the exact per-point head score costs against the linear closed form.

``ContextPruner`` scores a linear head in closed form (``||dl/dz|| * sqrt(||phi||^2 + 1)``,
one forward pass) and any other head (a convolution, as in NeRV) exactly, by one autograd pass
over per-point views of the head's parameters. Both are timed here, in one process, median of
``--repeats`` calls, against one plain forward pass over the same points (no autograd):

* SIREN 5x256 on a 64x64 RGB image, 4 tasks: the closed form, and ``strategy="exact"``
  forced on the same linear head;
* a NeRV-shaped frame decoder (``tests/_models.FrameDecoder``: 16x16 frames, two upsampling
  convolutions of 16 channels; frames are the points) on 4 clips of ``--frames`` frames: its
  convolutional head, scored exactly.

Run ``python benchmarks/bench_head.py --help`` for the flags (under a minute).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict

import torch
from torch import nn

import ncp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Siren, environment, header, image_batch

from tests._models import FrameDecoder


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _case(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> Dict[str, Any]:
    params = ncp.functional.init_params(model, x.shape[0])
    out: Dict[str, Any] = {}
    with torch.no_grad():
        out["forward_s"] = _median_s(lambda: ncp.forward(model, params, x), repeats)
    for strategy in ("auto", "exact"):
        select = ncp.ContextPruner(ratio=0.25, strategy=strategy).prepare(model, x, y)
        out[f"{select.strategy}_s"] = _median_s(lambda s=select: s.scores(params, x, y), repeats)
    return out


def run(frames: int, repeats: int, threads: int, seed: int) -> Dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    siren = _case(Siren(), *image_batch(64, 4, seed=seed), repeats)
    torch.manual_seed(seed)
    nerv = FrameDecoder(side=16, channels=16)
    g = torch.Generator().manual_seed(seed)
    times = torch.linspace(-1, 1, frames).view(1, frames, 1).expand(4, frames, 1)
    nerv_res = _case(nerv, times, torch.rand(4, frames, 16, 16, 3, generator=g), repeats)
    return {"siren": siren, "nerv": nerv_res, "env": environment("cpu"), "frames": frames}


def report(res: Dict[str, Any]) -> str:
    s, n = res["siren"], res["nerv"]
    closed = s.get("loop_s", s.get("vmap_s"))
    lines = [
        header("ncp head-score benchmark: one ContextPruner score call", res["env"]),
        f"SIREN 5x256, 4 x 4,096 points: forward {s['forward_s'] * 1e3:.1f} ms; closed form "
        f"{closed * 1e3:.1f} ms ({closed / s['forward_s']:.2f}x the forward); exact "
        f"{s['exact_s'] * 1e3:.1f} ms ({s['exact_s'] / s['forward_s']:.2f}x the forward, "
        f"{s['exact_s'] / closed:.2f}x the closed form)",
        f"NeRV-shaped decoder, 4 x {res['frames']} frames of 16x16: forward {n['forward_s'] * 1e3:.1f} ms; "
        f"exact (conv head) {n['exact_s'] * 1e3:.1f} ms ({n['exact_s'] / n['forward_s']:.2f}x "
        "the forward)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.frames < 2 or args.repeats < 1 or args.threads < 1:
        parser.error("--frames >= 2, --repeats >= 1, --threads >= 1")
    res = run(args.frames, args.repeats, args.threads, args.seed)
    print(report(res))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
