"""The run folder every example's training script shares: resumable, safe to load, one log format.

A run folder (``--out``) holds

- ``checkpoint.pt``: model, optimizer, every random state, the step and the settings. It is
  written to a temporary file and renamed (an interrupted save never leaves half a
  checkpoint) and read with ``torch.load(weights_only=True)``, so a checkpoint from somebody
  else cannot run code on your machine.
- ``metrics.jsonl``: one JSON object per record, each with its outer ``step``. A resumed run
  drops the records written after its checkpoint, so the log never holds a step twice.

A run started again with the same ``--out`` and flags resumes exactly where its checkpoint
left it. Only the settings a script lists as safe to change (horizon, logging, device...) may
differ; any other difference is refused with the names and both values.

The flag names are the same in every script: ``--out``, ``--outer-steps``, ``--outer-lr``,
``--inner-steps``, ``--inner-lr``, ``--bootstrap-steps``, ``--bootstrap-lr``,
``--bootstrap-weight``, ``--seed``, ``--device``, ``--threads``, ``--log-every`` and
``--ckpt-every``. Run folders written by ncp 0.2.0's examples, which spelled some of them
differently, still load: :func:`upgrade` renames their settings.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "CHECKPOINT",
    "LOG",
    "MetricsLog",
    "add_running_arguments",
    "check_resume",
    "load_checkpoint",
    "progress",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "upgrade",
]

CHECKPOINT = "checkpoint.pt"
LOG = "metrics.jsonl"

# Settings names of ncp 0.2.0's examples -> today's (one spelling across the scripts).
RENAMED: Dict[str, str] = {
    "steps": "outer_steps",
    "lr": "outer_lr",
    "boot_steps": "bootstrap_steps",
    "boot_lr": "bootstrap_lr",
    "boot_weight": "bootstrap_weight",
    "boot_chunk": "bootstrap_chunk",
    "run_dir": "out",
}


def upgrade(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """``settings`` with the names of ncp 0.2.0's examples renamed to today's (:data:`RENAMED`);
    a name already in today's spelling wins over its old spelling."""
    out = {RENAMED.get(k, k): v for k, v in settings.items() if k not in RENAMED}
    for old, new in RENAMED.items():
        if old in settings and new not in out:
            out[new] = settings[old]
    return out


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename.

    ``state`` must hold only tensors and plain Python values (what
    ``torch.load(weights_only=True)`` reads back): use :func:`rng_state` for random states.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``, its
    settings (key ``"settings"``; ``"config"`` in ncp 0.2.0's many-shot runs) upgraded."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds pickled Python objects, which this example does not load: loading them "
            "can run code. A checkpoint written by the examples of ncp <= 0.1 stores numpy random "
            "states that way. If you trust the file, rewrite it in the safe format with "
            f"`python -m examples.harness trust {path}`."
        ) from e
    if "settings" not in state and "config" in state:
        state["settings"] = state.pop("config")
    state["settings"] = upgrade(state["settings"])
    return state


def rng_state(
    device: torch.device | str = "cpu", **generators: torch.Generator | None
) -> Dict[str, Any]:
    """Every random state a run draws from, as tensors and plain values only (loads with
    ``weights_only=True``): torch's, CUDA's when ``device`` is a GPU, numpy's, Python's, and the
    named ``generators`` (None entries are kept as None)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
        "generators": {k: None if g is None else g.get_state() for k, g in generators.items()},
    }
    device = torch.device(device)
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(
    state: Mapping[str, Any],
    device: torch.device | str = "cpu",
    **generators: torch.Generator | None,
) -> None:
    """Restore what :func:`rng_state` saved, into the same named ``generators``."""
    torch.set_rng_state(state["torch"])
    if "numpy" in state:  # absent from ncp 0.2.0's many-shot checkpoints
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in state:
        python = state["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
    saved = state.get("generators", state)  # ncp 0.2.0 kept them at the top level
    for name, gen in generators.items():
        if gen is not None and saved.get(name) is not None:
            gen.set_state(saved[name])
    device = torch.device(device)
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class MetricsLog:
    """``metrics.jsonl`` of a run folder: one JSON object per line, each with a ``step``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record``."""
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(record)) + "\n")

    def records(self) -> List[Dict[str, Any]]:
        """Every record, in order ([] when there is no log yet)."""
        if not self.path.is_file():
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate(self, step: int) -> None:
        """Drop the records written after the checkpoint at ``step`` (they will be redone)."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def clear(self) -> None:
        """Remove the log."""
        self.path.unlink(missing_ok=True)


def check_resume(
    saved: Mapping[str, Any],
    now: Mapping[str, Any],
    *,
    may_change: Iterable[str],
    path: str | os.PathLike[str],
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Refuse to resume the checkpoint at ``path`` when a setting outside ``may_change``
    differs between ``saved`` and ``now``.

    ``may_change`` is an allow-list: a setting added later is frozen unless listed. A name
    missing from ``saved`` (a run written before the setting existed) compares as its value in
    ``defaults``.
    """
    allowed = set(may_change)
    defaults = {} if defaults is None else defaults
    diff = {
        k: (saved.get(k, defaults.get(k)), v)
        for k, v in now.items()
        if k not in allowed and saved.get(k, defaults.get(k)) != v
    }
    if diff:
        shown = ", ".join(f"{k}: {saved_v!r} -> {given!r}" for k, (saved_v, given) in diff.items())
        raise ValueError(
            f"{path} was written with other settings ({shown}, saved -> given); pass the same "
            "flags to resume, another --out, or --restart to start over."
        )


def resume(
    out: str | os.PathLike[str],
    settings: Mapping[str, Any],
    *,
    may_change: Iterable[str],
    states: Mapping[str, Any],
    generators: Mapping[str, torch.Generator | None] | None = None,
    device: torch.device | str = "cpu",
    restart: bool = False,
    defaults: Mapping[str, Any] | None = None,
) -> Tuple[int, MetricsLog]:
    """Open the run folder ``out`` and continue from its checkpoint, if any.

    Creates the folder; with ``restart`` deletes its checkpoint first. When
    ``out/checkpoint.pt`` exists, refuses settings that changed outside ``may_change``
    (:func:`check_resume`), loads each entry of ``states`` (objects with ``load_state_dict``,
    such as the model and the optimizer; None entries are skipped) from the checkpoint key of
    the same name, restores the random states into ``generators`` (unless None), and drops the
    log records written after the checkpoint. Without a checkpoint the log starts empty.

    Returns:
        The step to start from (0 for a new run) and the run's :class:`MetricsLog`.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT
    log = MetricsLog(folder / LOG)
    if restart:
        path.unlink(missing_ok=True)
    if not path.is_file():
        log.clear()
        return 0, log
    state = load_checkpoint(path, device)
    check_resume(state["settings"], settings, may_change=may_change, path=path, defaults=defaults)
    for name, obj in states.items():
        if obj is not None:
            obj.load_state_dict(state[name])
    if generators is not None:
        set_rng_state(state["rng"], device, **generators)
    log.truncate(state["step"])
    return state["step"], log


def saved_mb(out: str | os.PathLike[str]) -> float | None:
    """The bytes saved for backward by a run's first meta-step, in MiB (the ``memory`` record of
    its ``metrics.jsonl``), or None when it has none."""
    for record in MetricsLog(Path(out) / LOG).records():
        if record.get("event") == "memory":
            return record["peak_saved_bytes"] / 2**20
    return None


def run_logged(cmd: Sequence[str], folder: str | os.PathLike[str]) -> int:
    """Run ``cmd`` with one OpenMP thread, appending the command line and its output to
    ``folder/stdout.log``; return its exit status."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(Path(folder) / "stdout.log", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        done = subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    return done.returncode


def progress(total: int, *, desc: str, initial: int = 0, enabled: bool = True) -> Any:
    """A tqdm bar for ``total`` steps, starting at ``initial`` (a resumed run)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not enabled)


def add_running_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    defaults: Mapping[str, Any],
    *,
    fill_later: bool = False,
) -> None:
    """The flags that only say where and how a run goes, with the same names everywhere:
    ``--out``, ``--seed``, ``--device``, ``--threads``, ``--log-every``, ``--ckpt-every`` and
    ``--restart``.

    ``defaults`` holds each default under its settings name (``out``, ``seed``...), shown in
    ``--help``. With ``fill_later`` the flags default to None instead, for a script that lays
    the given flags over presets of its own.
    """

    def default(name: str) -> Any:
        return None if fill_later else defaults.get(name)

    def shown(name: str) -> str:
        return f" ({defaults[name]})" if defaults.get(name) is not None else ""

    a = parser.add_argument
    a("--out", default=default("out"), help="run folder" + shown("out"))
    a("--seed", type=int, default=default("seed"), help="seed of all the run draws" + shown("seed"))
    a("--device", default=default("device"), help="torch device" + shown("device"))
    a(
        "--threads",
        type=int,
        default=default("threads"),
        help="torch CPU threads" + shown("threads"),
    )
    a(
        "--log-every",
        type=int,
        default=default("log_every"),
        help="steps between log lines" + shown("log_every"),
    )
    a(
        "--ckpt-every",
        type=int,
        default=default("ckpt_every"),
        help="steps between checkpoints" + shown("ckpt_every"),
    )
    a("--restart", action="store_true", help="start over: ignore the checkpoint in --out")


def trust(path: str | os.PathLike[str]) -> None:
    """Rewrite the checkpoint at ``path`` (written by the examples of ncp <= 0.1, with numpy
    random states pickled) in the format :func:`load_checkpoint` reads. This *unpickles* the
    file: only do it for a file you trust."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    rng = state.get("rng", {})
    if isinstance(rng.get("numpy"), tuple):
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        rng["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
    save_checkpoint(state, path)
    torch.load(path, map_location="cpu", weights_only=True)  # now safe to load, or it raises


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m examples.harness trust PATH...``: see :func:`trust`."""
    parser = argparse.ArgumentParser(description="Rewrite old example checkpoints you trust.")
    parser.add_argument("command", choices=("trust",))
    parser.add_argument("paths", nargs="+", help="checkpoint.pt files")
    args = parser.parse_args(argv)
    for path in args.paths:
        trust(path)
        print(f"{path}: rewritten; it now loads with weights_only=True", file=sys.stderr)


if __name__ == "__main__":
    main()
