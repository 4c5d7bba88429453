"""Helpers shared by the benchmark scripts: data, timing, memory, the run header, isolation.

Not part of ncp's API. Every script in ``benchmarks/`` imports these, so that all of them
build the same SIREN and the same images, time the same way and print the same header.

Memory is read three ways, each stated where it is printed:

* **peak saved bytes**: ``ncp.MemoryMeter.peak_saved_bytes`` (tensors saved for backward,
  device-independent);
* **peak RSS**: the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``,
  else ``getrusage``), read in a fresh subprocess per measurement (:func:`run_isolated`), so
  one variant's peak never leaks into the next;
* **RSS above the setup**: the peak minus the RSS once the model and data exist and freed heap
  memory has been returned to the OS (``malloc_trim``); on Linux the high-water mark is reset
  there first (``/proc/self/clear_refs``), so the building of the data does not count.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping

import torch
from torch import Tensor

import ncp

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tests._models import siren as Siren  # noqa: E402, F401  (benchmarks depend on ncp and tests)

MB = 1e6
GB = 1e9


def image_batch(
    resolution: int, tasks: int, *, seed: int = 0, waves: int = 6
) -> tuple[Tensor, Tensor]:
    """Smooth random RGB images as a neural-field batch.

    Each channel is a sum of ``waves`` plane waves with frequencies of at most 3 periods across
    the image (amplitude falling as 1/frequency), rescaled to [0, 1]: low-frequency content,
    not white noise.

    Returns:
        ``x`` ``(tasks, resolution**2, 2)`` coordinates on ``[-1, 1]^2`` and ``y``
        ``(tasks, resolution**2, 3)`` values in ``[0, 1]``.
    """
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1.0, 1.0, resolution)
    coords = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    freqs = (torch.rand(tasks, 3, waves, 2, generator=g) * 2 - 1) * 3.0  # periods over [-1, 1]
    phases = torch.rand(tasks, 3, waves, generator=g) * 2 * math.pi
    amps = 1.0 / (1.0 + freqs.norm(dim=-1))
    # (tasks, 3, waves, points) -> (tasks, points, 3)
    arg = math.pi * torch.einsum("tcwd,pd->tcwp", freqs, coords) + phases[..., None]
    y = (amps[..., None] * torch.sin(arg)).sum(2).transpose(1, 2)
    lo, hi = y.amin(1, keepdim=True), y.amax(1, keepdim=True)
    y = (y - lo) / (hi - lo)
    x = coords.expand(tasks, -1, -1).contiguous()
    return x, y.contiguous()


@dataclass
class Measurement:
    name: str
    times_s: List[float] = field(default_factory=list)
    peak_saved_bytes: int = 0
    peak_cuda_bytes: int | None = None

    @property
    def time_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_time_s(self) -> float:
        return min(self.times_s)


def synchronize(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds ``fn`` takes, synchronising CUDA around it."""
    sync = synchronize(device)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def outer_step(model: torch.nn.Module, batch: tuple[Tensor, Tensor], cfg: ncp.MetaConfig) -> None:
    """One outer step as a user runs it: ``meta_step`` then ``backward``."""
    out = ncp.meta_step(model, batch, cfg)
    out.loss.backward()


def metered_step(
    name: str,
    model: torch.nn.Module,
    batch: tuple[Tensor, Tensor],
    cfg: ncp.MetaConfig,
    device: torch.device,
) -> Measurement:
    """One outer step under ``MemoryMeter`` (untimed); gradients are cleared after it."""
    with ncp.MemoryMeter(device) as meter:
        out = ncp.meta_step(model, batch, cfg)
        out.loss.backward()
        del out
    model.zero_grad(set_to_none=True)
    return Measurement(name, [], meter.peak_saved_bytes, meter.peak_cuda_bytes)


def warm_up(model: torch.nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    """One cheap step (MAML, K=1, full context), so that one-time costs (thread pools, cuBLAS
    handles and workspaces) fall on no measured step."""
    warm = ncp.meta_step(model, batch, ncp.MetaConfig(inner_steps=1, pruner=None, bootstrap=None))
    warm.loss.backward()
    del warm
    model.zero_grad(set_to_none=True)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine()


def environment(device: str | torch.device = "cpu") -> Dict[str, Any]:
    """What a figure depends on: versions, device, threads, cores, memory and the load now."""
    dev = torch.device(device)
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(dev),
        "device_name": device_name(dev),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": meminfo_bytes("MemTotal"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        # allocator settings change peak RSS and time (docs/benchmarks.md, "2048x2048")
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


def header(title: str, env: Mapping[str, Any], load_end: float | None = None) -> str:
    """The first lines every script prints: what ran, on what, under which load."""
    mem = env.get("mem_total_bytes")
    load = env.get("load_average_1min")
    load_text = "-" if load is None else f"{load:.2f}"
    if load_end is not None:
        load_text += f" at start, {load_end:.2f} at end"
    return "\n".join(
        [
            title,
            f"torch {env['torch']}, python {env['python']}, device {env['device']} "
            f"({env['device_name']}), threads {env['threads']}, {env['cpu_count']} cores, "
            f"{'-' if mem is None else f'{mem / GB:.1f} GB'} RAM",
            f"{env['date']}; 1-min load average {load_text}"
            + (f"; {env['malloc_env']}" if env.get("malloc_env") else ""),
        ]
    )


def _proc_kib_entry(path: str, key: str) -> int | None:
    """A ``key: N kB`` line of a ``/proc`` file, in bytes (None off Linux or when absent)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def meminfo_bytes(key: str) -> int | None:
    """A ``/proc/meminfo`` entry in bytes (None off Linux)."""
    return _proc_kib_entry("/proc/meminfo", key)


def _status_bytes(key: str) -> int | None:
    return _proc_kib_entry("/proc/self/status", key)


def rss_bytes() -> int | None:
    """Resident set size now (Linux), or None."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Resident-set high-water mark of this process."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def trim_heap() -> bool:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so that the RSS read
    next is what is in use; False where unavailable."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_isolated(
    script: str, function: str, spec: Mapping[str, Any], *, timeout: float | None = None
) -> Dict[str, Any]:
    """Run ``function(spec)`` of ``benchmarks/<script>.py`` in a fresh Python process.

    The function must return a JSON-serialisable dict; its stdout is otherwise ignored. A
    fresh process per measurement keeps each peak RSS to itself.

    Raises:
        RuntimeError: when the process fails (the tail of its stderr is included; a process
            killed for memory shows returncode -9).
    """
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(BENCH_DIR)!r})\n"
        f"from {script} import {function}\n"
        f"print('@@result ' + json.dumps({function}(json.loads(sys.argv[1]))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(dict(spec))],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@result ") and proc.returncode == 0:
            return json.loads(line[len("@@result ") :])
    raise RuntimeError(
        f"{script}.{function}({dict(spec)}) failed with returncode {proc.returncode}:\n"
        + proc.stderr[-3000:]
    )


def fmt_bytes(n: float | None, unit: float = MB) -> str:
    return "-" if n is None else f"{n / unit:.1f}"


def fmt_ratio(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def memory_limit_bytes(limit_gb: float | None) -> float | None:
    """``limit_gb`` in bytes, or 80 % of MemAvailable; None when neither is known."""
    if limit_gb is not None:
        return limit_gb * GB
    available = meminfo_bytes("MemAvailable")
    return None if available is None else 0.8 * available
