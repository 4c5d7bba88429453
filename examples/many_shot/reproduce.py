"""The Table 12 comparison on the offline stand-ins: every setting, arm and seed, one run at a
time.

Run from the repository root (the command behind ``docs/reproduction/many_shot.md``)::

    python -m examples.many_shot.reproduce --out runs/many_shot/v2 \\
        --settings glyphs-5w100s fashion-5w100s --seeds 0 1 2 -- --image-size 16 --hidden 16

For each seed, then each setting (so that a stopped run still leaves every setting with the
same seeds):

1. measure one MAML outer step's saved bytes and GradNCP's at the paper's horizon
   ``maml_steps / ratio``, and chunk GradNCP's bootstrap until it fits
   (:func:`examples.many_shot.compare.fit_memory`);
2. train and evaluate MAML, GradNCP (global top-k) and GradNCP (class-balanced) for that seed
   in ``OUT/SETTING/ARM-sSEED`` (finished runs are reused, unfinished ones resumed);
3. rewrite ``OUT/SETTING/summary.{json,md}`` and ``OUT/summary.md`` over the seeds done.

Flags after ``--`` go to every run (e.g. ``-- --hidden 32 --eval-episodes 300``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Dict, Sequence

import torch

from .compare import ARMS, compare, summarise_dir
from .train import add_arguments, config_from_args

SETTINGS: Dict[str, Dict[str, Any]] = {
    "glyphs-5w100s": {"data": "glyphs", "ways": 5, "shots": 100},
    "fashion-5w100s": {"data": "fashion", "ways": 5, "shots": 100},
    "glyphs-10w50s": {"data": "glyphs", "ways": 10, "shots": 50},
}


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/many_shot/repro")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--memory-slack", type=float, default=0.01)
    parser.add_argument("--glyph-bank", default=None, help="a rendered glyph bank .npz")
    parser.add_argument("--fashion-root", default=None, help="folder of Fashion-MNIST's .gz files")
    args = parser.parse_args(own)

    run_parser = argparse.ArgumentParser()
    add_arguments(run_parser)
    base = config_from_args(run_parser.parse_args(["--no-progress", *extra]))
    if base.threads is not None:
        torch.set_num_threads(base.threads)
    roots = {"glyphs": args.glyph_bank, "fashion": args.fashion_root}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for seed in args.seeds:
        for name in args.settings:
            setting = SETTINGS[name]
            cfg = dataclasses.replace(base, **setting, data_root=roots[setting["data"]])
            t1 = time.perf_counter()
            compare(cfg, out / name, [seed], args.arms, memory=True, slack=args.memory_slack)
            summarise_dir(out / name)
            print(
                f"{name} seed {seed}: {time.perf_counter() - t1:.0f} s "
                f"(total {time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        done = [n for n in args.settings if (out / n / "summary.md").is_file()]
        tables = [(out / n / "summary.md").read_text() for n in done]
        (out / "summary.md").write_text("\n".join(tables))
    print((out / "summary.md").read_text(), file=sys.stderr)


if __name__ == "__main__":
    main()
