"""Regional torch.compile: pure tensor functions of the model and the loss, run eagerly or fused by torch.compile.

A region holds no module, parameter hook, collective or RNG draw: its callers pass every tensor in. So a
compiled region composes with whatever runs around it (megatron's TP linears, DeepSpeed's ZeRO-3 hooks, the
pipeline engine, activation checkpointing), and one compiled graph serves every call site with the same
kind of inputs (every block of the network).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable

import torch

# Graphs kept per region: one per grad mode, autocast state, input view-ness, ... Sizes are dynamic, but a process
# that builds several layouts (tests, tools) needs more than dynamo's default of 8 (past the limit fullgraph raises).
GRAPHS = 64
_configured = False


def configure_dynamo() -> None:
    """torch.compile settings for the regions, applied once per process (at the first compiled region).

    Set globally instead of around every call: `torch._dynamo.config.patch` costs 4-24x a tiny fused op per call, and
    a region is called several times per block per micro-batch.
    * the per-function graph limit raised to GRAPHS (never lowered);
    * no donated buffers in compiled backwards: DeepSpeed's pipeline engine backpropagates a stage's outputs (h, c)
      one at a time with retain_graph=True, which a backward that donates its saved tensors refuses (the first
      pipeline step would raise).
    """
    global _configured
    if _configured:
        return
    import torch._dynamo  # noqa: F401  (torch imports it lazily)
    import torch._functorch.config

    config = torch._dynamo.config
    # The name changed in torch 2.6.
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), GRAPHS))
    if hasattr(torch._functorch.config, "donated_buffer"):  # torch >= 2.6
        torch._functorch.config.donated_buffer = False
    _configured = True


class Region:
    """A pure tensor function, run eagerly or through torch.compile (compiled lazily, on first use, or ahead of the
    first step by a warm-up: `sedd_scale.distributed.runner`)."""

    def __init__(self, fn: Callable):
        self.fn, self._compiled = fn, None
        self.__doc__ = fn.__doc__

    def __call__(self, compiled: bool, *args):
        """fn(*args), fused by torch.compile when `compiled`."""
        if not compiled:
            return self.fn(*args)
        if self._compiled is None:
            configure_dynamo()
            # Dynamic sizes from the start: training, evaluation and sampling batches, TP shards, loss chunks
            # share a graph instead of compiling one per shape.
            self._compiled = torch.compile(self.fn, fullgraph=True, dynamic=True)
        return self._compiled(*args)


def compilations() -> int:
    """Graph compilations in this process so far (dynamo captures, AOT autograd and inductor compiles, forward and
    backward), to check that a step found everything it runs already compiled."""
    from torch._dynamo.utils import counters

    inductor = sum(n for key, n in counters["inductor"].items() if key.startswith("fxgraph_cache_"))
    return counters["stats"]["unique_graphs"] + counters["aot_autograd"]["total"] + inductor


def check_compiler(device: torch.device) -> None:
    """Raise unless torch.compile can build kernels for `device`: on CPU inductor needs a C++ compiler."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        found = shutil.which(get_cpp_compiler()) is not None
    except (ImportError, RuntimeError):  # older torch, or inductor found no compiler
        found = shutil.which("g++") is not None or shutil.which("clang++") is not None
    if not found:
        raise RuntimeError("model.compile: true needs a C++ compiler for torch.compile on CPU (inductor builds its "
                           "kernels with it): install one (e.g. apt-get install g++) or set model.compile: false")
