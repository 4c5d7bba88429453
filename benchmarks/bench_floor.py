"""The floor of a GradNCP step: what a perfect implementation would take, from its pass count.

One outer step, per task, with ``M`` context points (the query set is the context, as for
neural fields) and ``k = ratio * M`` kept points:

* MAML with ``K`` steps: ``K`` second-order inner steps on ``M`` points (forward, gradient with
  its graph, and their part of the outer backward) and one query pass (forward and backward).
* GradNCP: ``K`` scoring passes on ``M`` points (a forward pass to the head's input, no graph;
  the closed-form score adds ``O(M)`` work), ``K`` second-order steps on ``k`` points, ``L``
  first-order bootstrap steps on ``M`` points (forward and backward, no graph), the same query
  pass, and the bootstrap distance (a few parameter-sized operations).

Each term is measured on its own, every measurement in a fresh process (``run_isolated``):

* ``s``: one forward pass of the model over all tasks' points without autograd (the scoring
  floor: no implementation can score a point without evaluating the network at it);
* ``b``: one first-order step on ``M`` points (forward and backward without a graph), which is
  also the work of the query pass (a forward and a backward over the context);
* ``i``: the ``K`` second-order steps on ``k`` points with their part of the outer backward,
  measured as MAML with ``K`` steps on a ``k``-point subset of each context (every 1/ratio-th
  point) minus its own query pass (``ratio * b``).

``floor = K s + i + L b + b``: the same passes without scoring overheads (selection, gathers),
without the bootstrap's distance and parameter copies, and with scoring as a bare forward pass; the script prints the floor, its ratio to MAML K=16 (the
best a GradNCP/MAML ratio can be on this machine) and ncp's measured GradNCP step against it.
Defaults: SIREN 5x256, 64x64 RGB, 4 tasks, K=16, ratio 0.25, L=5, two threads.

**Contention** (``--busy 0 1``): the same measurements again while ``N`` other processes keep
cores busy (each multiplies 512x512 matrices in a loop on one thread), as when a CPU is
shared; the script prints each round's GradNCP/MAML ratio, and how much each method's step
slowed down against the idle round.

**Pass-count options** (``--options L1 L2 bf16``): GradNCP with fewer bootstrap steps or
with its scoring forward pass in bfloat16, timed in the same run, each with its ratio to MAML
and its own floor (``L`` changed in the formula; bf16 keeps the float32 floor). Their PSNR cost
is measured by the reproduction runs (docs/benchmarks.md gives both).

**Interleaved** (``--interleaved N``): the units and both steps timed in the *same* process, in
rounds (forward pass, first-order step, MAML K=16, MAML K=16 on the kept points, GradNCP; then
again), so that the floor and the step are measured in the same units; ``N`` fresh processes of
that each, to show how much a fresh process moves both. On a VM whose process-to-process spread
is larger than the gap being measured, this is the comparison that can show "within 10 % of the
floor".

Run ``python benchmarks/bench_floor.py --help`` for the flags (about 2 minutes a round).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping

import torch

import ncp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Siren, environment, header, image_batch, outer_step, run_isolated

# Options that change GradNCP's pass count (--options): fewer bootstrap steps, or the scoring
# forward pass in bfloat16. Each is timed like the default and gets its own floor.
OPTIONS = {  # name: (bootstrap steps, None for the default L; what it is)
    "L0": (0, "no bootstrap"),
    "L1": (1, "bootstrap L=1"),
    "L2": (2, "bootstrap L=2"),
    "bf16": (None, "scoring in bfloat16"),
}


def _configs(k: int, ratio: float, boot: int) -> Dict[str, ncp.MetaConfig]:
    def gradncp(steps: int, score_dtype: torch.dtype | None = None) -> ncp.MetaConfig:
        return ncp.MetaConfig(
            inner_steps=k,
            pruner=ncp.ContextPruner(ratio=ratio, score_dtype=score_dtype),
            bootstrap=ncp.BootstrapMetaLoss(steps=steps) if steps else None,
        )

    configs = {
        "maml16": ncp.MetaConfig(inner_steps=k, pruner=None, bootstrap=None),
        "maml16_kept": ncp.MetaConfig(inner_steps=k, pruner=None, bootstrap=None),
        "gradncp": gradncp(boot),
    }
    for name, (steps, _) in OPTIONS.items():
        configs[f"gradncp_{name}"] = (
            gradncp(boot, torch.bfloat16) if steps is None else gradncp(steps)
        )
    return configs


def _step_fn(
    what: str, spec: Mapping[str, Any], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    """One outer step of variant ``what`` (a key of :func:`_configs`) as a closure; the
    gradients are cleared after it. ``maml16_kept`` runs on every (1/ratio)-th point."""
    cfg = _configs(spec["k"], spec["ratio"], spec["boot"])[what]
    if what == "maml16_kept":
        stride = max(1, round(1 / spec["ratio"]))
        x, y = x[:, ::stride].contiguous(), y[:, ::stride].contiguous()

    def step() -> None:
        outer_step(model, (x, y), cfg)
        model.zero_grad(set_to_none=True)

    return step


def _unit_fns(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Dict[str, Callable[[], None]]:
    """The unit passes over all tasks' points: ``forward_s`` (no autograd) and
    ``first_order_s`` (forward and backward, no graph kept)."""
    flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])

    def forward() -> None:
        with torch.no_grad():
            model(flat_x)

    def first_order() -> None:
        loss = ((model(flat_x) - flat_y) ** 2).mean()
        torch.autograd.grad(loss, list(model.parameters()))

    return {"forward_s": forward, "first_order_s": first_order}


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_interleaved(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """Every quantity in this one process, in rounds: the unit passes (three times each, as in
    ``measure``), MAML K, MAML K on the kept points and GradNCP, then the next round. One
    warm-up round is not counted. Returns each quantity's median over the rounds and its
    per-round times."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    model = Siren()
    x, y = image_batch(spec["resolution"], spec["tasks"], seed=spec["seed"])
    fns = dict(_unit_fns(model, x, y))
    for what in ("maml16", "maml16_kept", "gradncp"):
        fns[what] = _step_fn(what, spec, model, x, y)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for round_ in range(spec["repeats"] + 1):  # round 0 warms up (and touches the memory)
        for name, fn in fns.items():
            for _ in range(3 if name.endswith("_s") else 1):
                t = _timed(fn)
                if round_:
                    times[name].append(t)
    return {name: {"time_s": statistics.median(ts), "times_s": ts} for name, ts in times.items()}


def measure(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """One quantity in this fresh process: a variant's step time, or the unit passes."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    model = Siren()
    x, y = image_batch(spec["resolution"], spec["tasks"], seed=spec["seed"])
    if spec["what"] == "units":
        out: Dict[str, Any] = {}
        for name, fn in _unit_fns(model, x, y).items():
            fn()  # warm-up
            out[name] = statistics.median(_timed(fn) for _ in range(spec["repeats"] * 3))
        return out
    _step_fn(spec["what"], spec, model, x[:, :256], y[:, :256])()  # warm-up on a few points
    step = _step_fn(spec["what"], spec, model, x, y)
    # the first full-size step also touches its memory: not counted
    times = [_timed(step) for _ in range(spec["repeats"] + 1)]
    return {"time_s": statistics.median(times[1:]), "times_s": times}


BUSY = (
    "import torch\n"
    "torch.set_num_threads(1)\n"
    "a = torch.randn(512, 512)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a)\n"
)


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """``n`` background processes that keep one core each busy until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
    try:
        time.sleep(1.0 if n else 0.0)  # let them start
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def floor_parts(
    args: argparse.Namespace, s: float, b: float, maml_kept: float
) -> tuple[Dict[str, float], float]:
    """The floor's terms from the units: ``K s`` scoring, the K steps on the kept points (MAML
    on a kept-size context minus its query pass, ``ratio * b``), ``L b`` bootstrap, ``b`` query;
    and their sum."""
    parts = {
        "scoring": args.k * s,
        "inner steps": maml_kept - args.ratio * b,
        "bootstrap": args.bootstrap_steps * b,
        "query": b,
    }
    return parts, sum(parts.values())


def _base(args: argparse.Namespace) -> Dict[str, Any]:
    return {
        "resolution": args.resolution,
        "tasks": args.tasks,
        "threads": args.threads,
        "repeats": args.repeats,
        "seed": args.seed,
        "k": args.k,
        "ratio": args.ratio,
        "boot": args.bootstrap_steps,
    }


def run(args: argparse.Namespace, busy: int = 0) -> Dict[str, Any]:
    base = _base(args)
    env = environment("cpu")
    env["threads"] = args.threads
    got = {}
    with busy_processes(busy):
        for what in ("units", "maml16", "maml16_kept", "gradncp", *options(args)):
            got[what] = run_isolated("bench_floor", "measure", {**base, "what": what})
            print(f"  busy={busy} {what}: {json.dumps(got[what])[:100]}", file=sys.stderr)
    boot = args.bootstrap_steps
    t16 = got["maml16"]["time_s"]
    s, b = got["units"]["forward_s"], got["units"]["first_order_s"]
    parts, floor = floor_parts(args, s, b, got["maml16_kept"]["time_s"])
    inner = parts["inner steps"]
    opts = {}
    for name in args.options:
        steps = OPTIONS[name][0]
        steps = boot if steps is None else steps
        opt_floor = floor + (steps - boot) * b  # bf16 scoring: the float32 floor
        t = got[f"gradncp_{name}"]["time_s"]
        opts[name] = {"time_s": t, "ratio": t / t16, "floor_ratio": opt_floor / t16}
    return {
        "setup": base,
        "busy_processes": busy,
        "env": env,
        "measured": got,
        "units": {"s": s, "i": inner, "b": b},
        "floor_parts_s": parts,
        "floor_s": floor,
        "floor_ratio": floor / t16,
        "measured_ratio": got["gradncp"]["time_s"] / t16,
        "measured_over_floor": got["gradncp"]["time_s"] / floor,
        "options": opts,
        "load_average_1min_end": environment("cpu")["load_average_1min"],
    }


def report(res: Mapping[str, Any]) -> str:
    s, u, m = res["setup"], res["units"], res["measured"]
    lines = [
        f"-- {res['busy_processes']} other busy process(es) during the measurements",
        header(
            f"ncp floor benchmark: SIREN 5x256, {s['resolution']}x{s['resolution']} RGB, "
            f"{s['tasks']} tasks; GradNCP K={s['k']} ratio {s['ratio']} L={s['boot']} against "
            f"MAML K={s['k']}; every quantity in a fresh process",
            res["env"],
            res["load_average_1min_end"],
        ),
        f"units (s): forward over the context s={u['s']:.4f}, first-order step b={u['b']:.4f}, "
        f"K second-order steps on the kept points i={u['i']:.4f}",
        f"MAML K={s['k']}: {m['maml16']['time_s']:.3f} s; GradNCP: {m['gradncp']['time_s']:.3f} s",
        "floor of a GradNCP step: "
        + ", ".join(f"{name} {v:.3f} s" for name, v in res["floor_parts_s"].items())
        + f" = {res['floor_s']:.3f} s",
        f"floor / MAML K={s['k']}: {res['floor_ratio']:.3f}; measured GradNCP / MAML: "
        f"{res['measured_ratio']:.3f}; measured / floor: {res['measured_over_floor']:.2f}",
        "note: every term is a bare pass of the same size as GradNCP's; what the floor leaves "
        "out is the selection, the gathers of the kept points and the bootstrap's distance.",
    ]
    for name, o in res["options"].items():
        lines.append(
            f"option {name} ({OPTIONS[name][1]}): GradNCP {o['time_s']:.3f} s, / MAML "
            f"K={s['k']} {o['ratio']:.3f} (its floor {o['floor_ratio']:.3f})"
        )
    return "\n".join(lines)


def run_interleaved(args: argparse.Namespace) -> Dict[str, Any]:
    """``args.interleaved`` fresh processes, each timing every quantity in rounds in itself."""
    env = environment("cpu")
    env["threads"] = args.threads
    procs = []
    for i in range(args.interleaved):
        got = run_isolated("bench_floor", "measure_interleaved", _base(args))
        t16, t = got["maml16"]["time_s"], got["gradncp"]["time_s"]
        _, floor = floor_parts(
            args,
            got["forward_s"]["time_s"],
            got["first_order_s"]["time_s"],
            got["maml16_kept"]["time_s"],
        )
        procs.append(
            {
                "measured": got,
                "floor_s": floor,
                "floor_ratio": floor / t16,
                "measured_ratio": t / t16,
                "measured_over_floor": t / floor,
            }
        )
        print(f"  process {i}: {json.dumps(procs[-1])[:160]}", file=sys.stderr)
    return {
        "setup": _base(args),
        "env": env,
        "processes": procs,
        "load_average_1min_end": environment("cpu")["load_average_1min"],
    }


def report_interleaved(res: Mapping[str, Any]) -> str:
    s = res["setup"]
    lines = [
        header(
            f"ncp floor benchmark, interleaved: SIREN 5x256, {s['resolution']}x{s['resolution']} "
            f"RGB, {s['tasks']} tasks; GradNCP K={s['k']} ratio {s['ratio']} L={s['boot']} "
            f"against MAML K={s['k']}; units and steps timed in rounds inside each process "
            f"({s['repeats']} rounds after a warm-up round)",
            res["env"],
            res["load_average_1min_end"],
        ),
        "| process | MAML K (s) | GradNCP (s) | floor (s) | GradNCP / MAML | floor / MAML "
        "| GradNCP / floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, p in enumerate(res["processes"]):
        m = p["measured"]
        lines.append(
            f"| {i} | {m['maml16']['time_s']:.3f} | {m['gradncp']['time_s']:.3f} "
            f"| {p['floor_s']:.3f} | {p['measured_ratio']:.3f} | {p['floor_ratio']:.3f} "
            f"| {p['measured_over_floor']:.3f} |"
        )
    over = [p["measured_over_floor"] for p in res["processes"]]
    lines.append(
        f"GradNCP / floor: median {statistics.median(over):.3f} over {len(over)} processes "
        f"(range {min(over):.3f}-{max(over):.3f})"
    )
    return "\n".join(lines)


def options(args: argparse.Namespace) -> List[str]:
    return [f"gradncp_{name}" for name in args.options]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--k", type=int, default=16, help="inner steps K of both methods")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--bootstrap-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--busy",
        type=int,
        nargs="+",
        default=[0],
        help="rounds, each with this many busy background processes (e.g. 0 1)",
    )
    parser.add_argument(
        "--options",
        nargs="*",
        choices=tuple(OPTIONS),
        default=[],
        help="also time GradNCP with these pass-count options: L0/L1/L2 bootstrap steps, bf16 "
        "scoring",
    )
    parser.add_argument(
        "--interleaved",
        type=int,
        default=0,
        metavar="N",
        help="instead: N fresh processes, each timing the units and both steps in rounds "
        "inside itself (--repeats rounds)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.k < 4 or not 0 < args.ratio <= 1 or args.repeats < 1 or args.bootstrap_steps < 0:
        parser.error("--k >= 4, --ratio in (0, 1], --repeats >= 1, --bootstrap-steps >= 0")
    if min(args.busy) < 0:
        parser.error(f"--busy takes counts >= 0, got {args.busy}")
    if args.interleaved < 0:
        parser.error(f"--interleaved takes a process count >= 0, got {args.interleaved}")
    if args.interleaved:
        res = run_interleaved(args)
        print(report_interleaved(res), flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(res, indent=2) + "\n")
        return
    rounds: List[Dict[str, Any]] = []
    for busy in args.busy:
        rounds.append(run(args, busy))
        print(report(rounds[-1]), flush=True)
    if len(rounds) > 1:
        first = rounds[0]["measured"]
        for r in rounds[1:]:
            slow = {
                w: r["measured"][w]["time_s"] / first[w]["time_s"] for w in ("maml16", "gradncp")
            }
            print(
                f"slow-down with {r['busy_processes']} busy against {rounds[0]['busy_processes']}: "
                f"MAML x{slow['maml16']:.2f}, GradNCP x{slow['gradncp']:.2f}; GradNCP/MAML "
                f"{rounds[0]['measured_ratio']:.3f} -> {r['measured_ratio']:.3f}"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(rounds, indent=2) + "\n")


if __name__ == "__main__":
    main()
