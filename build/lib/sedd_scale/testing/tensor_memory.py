"""Live tensor memory counted at the tensor level, on any device: the bytes of every storage alive.

`LiveTensorMemory` is a `TorchDispatchMode`: every tensor an operator returns inside the context
has its storage registered once (views share it) with a weak-reference finaliser that subtracts its
bytes when the storage is freed, so `current` is the bytes held by live storages created in the
context and `peak` the most held at any operator. This is what `torch.cuda.max_memory_allocated`
reports on a GPU (less the allocator's rounding), measured the same way on a CPU, where no such
counter exists. Resident-set size would include the interpreter, libraries and freed-but-cached
pages, so it is not used.

Not seen: storages made without an operator (`torch.from_numpy`, `torch.load`, `torch.frombuffer`)
and storages created before the context was entered. `UntypedStorage.resize_` is not an operator,
so it is patched while the context is active (DeepSpeed and megatron-core do not call it; the
patch keeps the count right if they ever do).
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorMemory(TorchDispatchMode):
    """Counts live storage bytes (`current`) and their maximum (`peak`) for tensors made in the context."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # id of a live storage's StorageImpl -> bytes counted
        self._lock = threading.Lock()  # storages may be freed on another thread (finalisers)
        self._resize = None

    def reset_peak(self) -> None:
        """Start a new peak from the bytes alive now (e.g. after a warm-up step)."""
        self.peak = self.current

    def _freed(self, key: int) -> None:
        with self._lock:
            self.current -= self._sizes.pop(key, 0)

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, nbytes = storage._cdata, storage.nbytes()
        with self._lock:
            known = self._sizes.get(key)
            if known is None:
                self._sizes[key] = nbytes
                self.current += nbytes
                # The storage's Python object lives exactly as long as the storage (PyObject preservation).
                weakref.finalize(storage, self._freed, key)
            elif known != nbytes:  # resized in place
                self._sizes[key] = nbytes
                self.current += nbytes - known
            self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta":
                self._count(t.untyped_storage())
        return out

    def __enter__(self):
        # (the class's own attribute, if any, is put back on exit; else the inherited method shows again)
        self._resize = torch.UntypedStorage.__dict__.get("resize_")
        original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            result = original(storage, size)
            if storage._cdata in tracker._sizes:
                tracker._count(storage)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        if self._resize is None:
            del torch.UntypedStorage.resize_
        else:
            torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)
