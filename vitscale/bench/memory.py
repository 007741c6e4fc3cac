"""Peak tensor memory of a stretch of code, on CPU as well as on GPU.

On a GPU, ``torch.cuda.max_memory_allocated`` is the measurement. A CPU has no such counter, and the process's
resident size (RSS) is a poor proxy: it includes the Python interpreter and libraries (hundreds of MB), glibc
keeps freed blocks, and ``torch.empty`` pages that are never written do not count. :class:`LiveTensorMemory`
instead counts what ``max_memory_allocated`` counts on a GPU: the bytes of every live tensor storage. It is a
``TorchDispatchMode``: every ATen op's outputs are seen as they are created (forward, backward — the autograd
engine carries the mode to its threads — optimizer and DeepSpeed ops alike), each new storage is recorded with a
weak reference, and storages whose last reference died are dropped before the next allocation is counted.
The result is deterministic (the same code gives the same bytes on every run) and independent of the allocator.
Not seen: kernels' internal scratch buffers, storages resized in place (``storage.resize_``, used by ZeRO-3 to
free gathered parameters) and memory made outside ATen (numpy arrays).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorMemory(TorchDispatchMode):
    """Track live storage bytes of tensors on ``device_type`` created while the mode is active.

    ``current`` is the bytes alive now, ``peak`` the most ever alive at once since the last :meth:`reset_peak`.
    Storages that existed before the mode was entered are not counted: enter it before building the model.
    """

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # StorageImpl address -> (weak ref, bytes)
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def _record(self, out: Any) -> None:
        fresh = []
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type and not t.is_meta:
                st = t.untyped_storage()
                nbytes = st.nbytes()
                if nbytes:
                    ref = StorageWeakRef(st)
                    if ref.cdata not in self.live:
                        fresh.append((ref, nbytes))
        if not fresh:
            return  # a view or an in-place op: nothing new
        self._sweep()  # frees that happened before this allocation
        for ref, nbytes in fresh:
            if ref.cdata not in self.live:
                self.live[ref.cdata] = (ref, nbytes)
                self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._record(out)
        return out

    def reset_peak(self) -> None:
        """Start a new peak window at the bytes alive now."""
        self._sweep()
        self.peak = self.current

    def live_bytes(self) -> int:
        self._sweep()
        return self.current
