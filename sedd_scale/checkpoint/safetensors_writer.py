"""A safetensors file written one tensor at a time (no copy of the whole state in memory).

`safetensors.torch.save_file` serialises every tensor into one buffer before writing, so exporting a
model holds it twice; at 7B (28 GB of fp32 EMA) that is the difference between one host and none.
This writes the same format (an 8-byte little-endian header length, a JSON header padded with spaces
to 8 bytes, then each tensor's little-endian bytes back to back in header order), which
`safetensors.safe_open` / `load_file` read and validate as usual.
"""
from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def save_tensors(tensors: dict[str, Tensor], path: str | Path, written: Callable[[int], object] | None = None) -> None:
    """Write `tensors` (CPU or not; copied to the host one at a time) as a safetensors file at `path`; `written` is
    told each tensor's bytes as they go (a progress bar)."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian bytes; this writer runs on little-endian hosts only")
    header, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
            if written is not None:
                written(t.numel() * t.element_size())
