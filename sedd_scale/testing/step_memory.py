"""Measured tensor memory of real training steps: the oracle the layout planner is checked against.

`measure(recipe)` runs in each rank of a launched world (`sedd_scale.testing.spawn.launch` on CPU): it
builds the real `Trainer` (DeepSpeed engine, megatron-core layers, fused loss, sharded EMA) on
synthetic tokens inside a `LiveTensorMemory` context, so every tensor the run creates is counted,
runs one warm-up step (the optimizer creates its state lazily), then `steps` more, and reports:

* resident: the bytes alive between steps (weights, optimizer state, EMA, persistent buffers);
* peak: the most alive at any operator during the measured steps;
* forward / backward / step: the peak inside each of the engine's calls (PP = 1: `engine.forward`,
  `engine.backward`, which also reduces the gradients at a step boundary, and `engine.step`).
  A pipeline runs all three inside `train_batch`, so only the peak is reported there.

ZeRO's reduce buckets have `parallel.zero_reduce_bucket_size` elements (2e8 by default), allocated whole
however small the model: `validation_recipe(..., reduce_bucket_size)` lowers it in the recipe so that a small
model's run shows the rest of the memory; the planner reads the same recipe.
"""
from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from typing import Any

import torch

# The small SEDD the planner's memory model is validated on: big enough that activations and model
# states are both tens of MiB (fixed overheads are noise), small enough for 2 CPU cores.
VALIDATION_MODEL = {"hidden_size": 256, "n_heads": 4, "n_blocks": 4, "cond_dim": 64, "num_tokens": 2047, "length": 128,
                    "vocab_multiple": 1, "dropout": 0.0}


def validation_recipe(model: dict, parallel: dict, world: int, reduce_bucket_size: int | None = None) -> dict:
    """A raw recipe of VALIDATION_MODEL (with `model` overrides) for `world` ranks: micro 4 x 128 tokens and two
    micro-batches per step on every rank (so gradients exist during the second forward, as at scale);
    `reduce_bucket_size`: parallel.zero_reduce_bucket_size (None: the recipe's default)."""
    dp = world // (parallel.get("tp", 1) * parallel.get("context_parallel", 1) * parallel.get("pp", 1))
    if reduce_bucket_size is not None:
        parallel = {**parallel, "zero_reduce_bucket_size": reduce_bucket_size}
    m = {**VALIDATION_MODEL, **model}
    return {"model": m, "data": {"manifests": ["unused.json"], "tokenizer": None, "seq_len": m["length"],
                                 "num_workers": 0},
            "optim": {"lr": 1e-3, "warmup": 1}, "train": {"ema": 0.9, "async_save": False},
            "parallel": {"micro_batch": 4, "global_batch": 8 * dp, **parallel}}


def measure_cases(cases: dict[str, tuple[dict, dict]], world: int, reduce_bucket_size: int | None) -> dict:
    """On each rank of a launched world: `measure` every case (name -> (model overrides, parallel)) in turn."""
    return {name: measure(validation_recipe(model, parallel, world, reduce_bucket_size))
            for name, (model, parallel) in cases.items()}


class RandomTokens:
    """This rank's micro-batches of uniform random tokens, a function of (seed, count, DP rank)."""

    def __init__(self, num_tokens: int, micro_batch: int, seq_len: int, dp_rank: int, seed: int = 0):
        self.shape, self.num_tokens, self.dp_rank, self.seed = (micro_batch, seq_len), num_tokens, dp_rank, seed
        self.count = 0

    def __iter__(self):
        while True:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.count) * 1009 + self.dp_rank)
            self.count += 1
            yield torch.randint(0, self.num_tokens, self.shape, generator=gen)

    def state_dict(self) -> dict:
        """The number of micro-batches drawn."""
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Continue after `state["count"]` micro-batches."""
        self.count = state["count"]


def _phase_hooks(engine, mem, phases: dict[str, int]) -> None:
    """Record the peak inside each of engine.forward/backward/step into `phases` (instance attributes)."""
    def wrap(fn, name):
        def call(*args, **kwargs):
            outer = mem.peak
            mem.peak = mem.current
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = max(phases.get(name, 0), mem.peak)
                mem.peak = max(outer, mem.peak)
        return call

    engine.forward, engine.backward, engine.step = (wrap(engine.forward, "forward"), wrap(engine.backward, "backward"),
                                                    wrap(engine.step, "step"))


def measure(recipe_data: dict, steps: int = 2, meter=None) -> dict[str, Any]:
    """On each rank of a launched world: train `steps` measured steps of `recipe_data` (a raw recipe mapping;
    its checkpoint.dir is replaced by a temporary one) and return this rank's bytes (see the module docstring).
    `meter`: a context manager class with LiveTensorMemory's `current`, `peak` and `reset_peak()` (default: that
    one; benchmarks/gpu_check.py passes torch.cuda's allocator counters)."""
    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    from megatron.core import parallel_state as ps

    from sedd_scale.config import Recipe, from_dict
    from sedd_scale.distributed import engine, parallel
    from sedd_scale.testing.tensor_memory import LiveTensorMemory
    from sedd_scale.train.trainer import Trainer

    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = copy.deepcopy(recipe_data)
            data.setdefault("checkpoint", {})["dir"] = tmp
            recipe = from_dict(Recipe, data)
            layout, topology = engine.setup(recipe)
            with (meter or LiveTensorMemory)() as mem:
                loader = RandomTokens(recipe.model.num_tokens, layout.micro_batch, recipe.data.seq_len,
                                         ps.get_data_parallel_rank(), recipe.train.seed)
                with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints memory reports while building
                    trainer = Trainer(recipe, layout, topology, loader=loader)
                trainer.train_step()  # warm-up: the optimizer state appears at the first step
                phases: dict[str, int] = {}
                if layout.pp == 1:
                    _phase_hooks(trainer.engine, mem, phases)
                mem.reset_peak()
                for _ in range(steps):
                    trainer.train_step()
                result = {"resident": mem.current, "peak": mem.peak, **phases,
                          "stage": ps.get_pipeline_model_parallel_rank(),
                          "params": sum(p.numel() for p in trainer.engine.module.parameters())}
                trainer.saver.close()
                del trainer
            return result
    finally:
        parallel.destroy_parallel()
