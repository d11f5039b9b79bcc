"""The streaming safetensors writer against the safetensors library: what it writes reads back bitwise."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sedd_scale.checkpoint.safetensors_writer import save_tensors


def test_every_dtype_and_shape_reads_back_bitwise(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 5, generator=g), "half": torch.randn(7, generator=g).bfloat16(),
               "f16": torch.randn(2, 2, generator=g).half(), "f64": torch.randn(4, generator=g, dtype=torch.float64),
               "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3), "mask": torch.tensor([True, False, True]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "bytes": torch.arange(3, dtype=torch.uint8),
               "strided": torch.randn(4, 6, generator=g).t()}  # non-contiguous: written in logical order
    save_tensors(tensors, tmp_path / "ours.safetensors")
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:  # lazy per-tensor reads validate offsets too
        assert torch.equal(f.get_tensor("strided"), tensors["strided"])
    theirs = {k: v.contiguous() for k, v in tensors.items()}
    save_file(theirs, str(tmp_path / "theirs.safetensors"))
    assert (tmp_path / "ours.safetensors").stat().st_size == (tmp_path / "theirs.safetensors").stat().st_size


def test_unsupported_dtype_is_named(tmp_path):
    with pytest.raises(TypeError, match="z: dtype torch.complex64"):
        save_tensors({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x.safetensors")
