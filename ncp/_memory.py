"""Memory accounting: bytes of tensors saved for backward, and the CUDA allocator's peak."""

from __future__ import annotations

from collections import Counter
from types import TracebackType
from typing import Any, Tuple, Type, Union

import torch
from torch import Tensor


class _Saved:
    """A tensor saved for backward; counts itself out when autograd frees it."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, tensor: Tensor, key: Tuple[Any, ...], meter: MemoryMeter) -> None:
        self.tensor = tensor
        self.key = key
        self.meter = meter

    def __del__(self) -> None:
        self.meter._release(self.key)


class MemoryMeter:
    """Measures the peak memory of the autograd graphs built inside a ``with`` block.

    ``peak_saved_bytes`` is the largest total size of tensors saved for backward that were
    alive at the same time (via :func:`torch.autograd.graph.saved_tensors_hooks`): storages
    shared by several saved tensors count once, and a tensor counts out as soon as autograd
    frees it (after ``backward``, or when its graph is dropped). This is the memory that grows
    with the inner steps and the context size in MAML, and it is device-independent, so the
    CPU figures predict the GPU ones. On CUDA (``device`` given as a CUDA device),
    ``peak_cuda_bytes`` is the allocator's peak above what was allocated on entry.

    Meters do not nest: saved-tensor hooks are a per-thread stack, so while an inner meter is
    active an outer one sees nothing. Use one meter per measurement.

    Activation checkpointing hides what it recomputes: the tensors a checkpointed region
    (``torch.utils.checkpoint``, ``MetaConfig(recompute_steps=True)``, the chunked query loss
    of ``MetaConfig(chunk_size=...)``) saves are held by the checkpoint, not the meter, so the
    peak counts only its inputs, and the graph rebuilt during ``backward`` is not seen. For
    such configurations read the peak as what is held between the forward pass and
    ``backward``; ``peak_cuda_bytes`` or the process's peak RSS include the recomputation.

    Args:
        device: the device to read allocator statistics from; only CUDA devices have them.

    Attributes:
        peak_saved_bytes: the peak described above, in bytes.
        peak_cuda_bytes: on a CUDA ``device``, the allocator's peak above what was allocated on
            entry; None otherwise.
        device: the device given.

    Example:
        >>> import torch, ncp
        >>> w = torch.randn(256, 256, requires_grad=True)
        >>> with ncp.MemoryMeter() as meter:
        ...     loss = (torch.randn(128, 256) @ w).tanh().sum()
        ...     loss.backward()
        >>> meter.peak_saved_bytes > 0 and meter.saved_bytes == 0
        True
    """

    def __init__(self, device: Union[str, torch.device] | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.peak_saved_bytes = 0
        self.peak_cuda_bytes: int | None = None
        self._current = 0
        self._counts: Counter = Counter()
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._cuda_base = 0

    @property
    def saved_bytes(self) -> int:
        """Bytes of saved tensors alive now."""
        return self._current

    def _pack(self, tensor: Tensor) -> _Saved:
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr(), storage.nbytes())
        if self._counts[key] == 0:
            self._current += storage.nbytes()
            self.peak_saved_bytes = max(self.peak_saved_bytes, self._current)
        self._counts[key] += 1
        # Keep a detached alias: holding the tensor itself would, for ops that save their own
        # output (exp, tanh, sqrt), form a reference cycle through the graph that keeps a graph
        # dropped without backward alive. Autograd restores the graph links on unpack.
        return _Saved(tensor.detach(), key, self)

    def _release(self, key: Tuple[Any, ...]) -> None:
        self._counts[key] -= 1
        if self._counts[key] == 0:
            del self._counts[key]
            self._current -= key[2]

    @staticmethod
    def _unpack(saved: _Saved) -> Tensor:
        return saved.tensor

    def __enter__(self) -> MemoryMeter:
        if self._hooks is not None:
            raise RuntimeError(
                "this MemoryMeter is already active; meters do not nest (an outer meter would "
                "not see what is saved inside an inner one): use one meter per measurement."
            )
        self.peak_saved_bytes = self._current
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_base = torch.cuda.memory_allocated(self.device)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        exc_type: Type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(exc_type, exc, tb)
        self._hooks = None
        if self.device is not None and self.device.type == "cuda":
            self.peak_cuda_bytes = torch.cuda.max_memory_allocated(self.device) - self._cuda_base

    def __repr__(self) -> str:
        cuda = "" if self.peak_cuda_bytes is None else f", peak_cuda_bytes={self.peak_cuda_bytes}"
        return f"MemoryMeter(peak_saved_bytes={self.peak_saved_bytes}{cuda})"
