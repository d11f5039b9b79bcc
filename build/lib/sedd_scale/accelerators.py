"""Optional fused kernels from NVIDIA apex and Transformer Engine, picked once per process, else torch.

Neither is on PyPI in a form pip can build without CUDA (PyPI's "apex" is an unrelated package):
they come with NVIDIA's NGC PyTorch containers (use them with `SEDD_PYTHON=$(which python)
./launcher.sh ...`), or from source (github.com/NVIDIA/apex, `pip install -v --no-build-isolation
--config-settings "--build-option=--cpp_ext" --config-settings "--build-option=--cuda_ext" .`;
Transformer Engine: `pip install transformer_engine[pytorch]` on a CUDA machine). Where they are
importable on a CUDA device:

* LayerNorm: apex's fused LayerNorm kernel (`fused_layer_norm_affine`), unless the blocks are
  compiled (torch.compile fuses torch's LayerNorm with the adaLN modulation around it; apex's
  kernel is opaque to it), else torch's.
* AdamW: apex's FusedAdam (multi-tensor, adam_w_mode) under the same non-finite guard, else torch's
  fused AdamW on CUDA, else torch's.
* Transformer Engine is detected and reported but not used: its gains are LayerNorm+GEMM fusion and
  FP8 GEMMs, and in this network every LayerNorm's output is modulated by adaLN before its GEMM, so
  the fusion does not apply; FP8 training is not supported here.

`choose()` is computed once per process and logged once (`describe()`).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """What this process uses, and why."""

    layer_norm: str  # "apex" | "torch"
    adam: str  # "apex" | "torch-fused" | "torch"
    transformer_engine: str  # "unused: <why>" | "absent"
    reason: str

    def describe(self) -> str:
        """One line for the log."""
        return (f"accelerators: LayerNorm {self.layer_norm}, AdamW {self.adam}, Transformer Engine "
                f"{self.transformer_engine} ({self.reason})")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a stub module without a spec
        return False


@lru_cache(maxsize=None)
def choose(cuda: bool | None = None, compiled: bool = False) -> Choice:
    """The kernels to use on this process's device (`cuda`: default torch.cuda.is_available()), logged once."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    has_apex = _importable("apex.normalization") and _importable("apex.optimizers")
    te = ("unused: every LayerNorm output is adaLN-modulated before its GEMM, so TE's LayerNorm+GEMM fusion does "
          "not apply" if _importable("transformer_engine") else "absent")
    if not cuda:
        choice = Choice("torch", "torch", te, "no CUDA device: apex and Transformer Engine run on CUDA only")
    elif has_apex:
        choice = Choice("torch" if compiled else "apex", "apex", te,
                        "apex importable" + ("; compiled blocks fuse torch's LayerNorm" if compiled else ""))
    else:
        choice = Choice("torch", "torch-fused", te, "apex not importable (NGC containers ship it)")
    log.info(choice.describe())
    return choice


@lru_cache(maxsize=None)
def _apex_layer_norm():
    return importlib.import_module("apex.normalization.fused_layer_norm").fused_layer_norm_affine


def layer_norm(x: Tensor, weight: Tensor, eps: float, choice: Choice) -> Tensor:
    """LayerNorm over the last dim with a weight and no bias, in float32 (the reference's), as `choice` says."""
    if choice.layer_norm == "apex":
        w = weight.float()
        return _apex_layer_norm()(x.float(), w, torch.zeros_like(w), weight.shape, eps)  # its kernel takes a bias
    return F.layer_norm(x.float(), weight.shape, eps=eps) * weight


def adam_class(choice: Choice):
    """The AdamW implementation `choice` names: apex's FusedAdam class, or torch.optim.AdamW."""
    if choice.adam == "apex":
        return importlib.import_module("apex.optimizers").FusedAdam
    return torch.optim.AdamW
