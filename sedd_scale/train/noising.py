"""Layout-independent noising of training batches.

An optimizer step's global batch is one list of rows: micro-batch m of data-parallel rank r holds
rows m * (micro * dp) + r * micro + [0, micro). The step's times and per-token noise are drawn for
all rows from a generator seeded by (seed, step), and each micro-batch keeps its own rows. So a
row's noise does not depend on how the batch is split (TP/PP/DP, gradient accumulation), runs
resumed from a checkpoint see the same noise, and pipeline stages that each prepare the batch
agree without communicating.

Conditional (prompt/response) rows: positions marked `given` keep their clean token (every position is
still drawn, so the generator stream and the free positions' noise are those of the same rows without a
prompt) and `rate` becomes a per-token weight, rate(t) on the response and 0 on the prompt, so the loss
neither noises nor scores the prompt under either graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sedd_scale.diffusion.graph import Graph
from sedd_scale.diffusion.noise import Noise, sample_times


@dataclass
class NoisedBatch:
    """A micro-batch ready for the model (x_t, total_noise) and the loss (x0, x_t, total_noise, rate).

    `rate` is rate(t) per sequence (B,), or with a prompt mask the per-token weight (B, L): rate(t) on the response,
    0 on the prompt."""

    x0: Tensor
    x_t: Tensor
    total_noise: Tensor
    rate: Tensor


def noise_batch(x0: Tensor, graph: Graph, noise: Noise, *, seed: int, step: int, row_offset: int,
                global_rows: int, sampling_eps: float = 1e-3, stratified: bool = False,
                given: Tensor | None = None) -> NoisedBatch:
    """Noise rows [row_offset, row_offset + len(x0)) of step `step`'s global batch of `global_rows`; `given`
    (bool, like x0): prompt positions, held clean and weighted 0 (module docstring)."""
    rows, length = x0.shape
    if row_offset < 0 or row_offset + rows > global_rows:
        raise ValueError(f"rows [{row_offset}, {row_offset + rows}) fall outside the global batch of {global_rows}")
    gen = torch.Generator(device=x0.device)
    gen.manual_seed((seed * 0x9E3779B1 + step * 0x85EBCA77) % (1 << 63))
    t = sample_times(global_rows, eps=sampling_eps, stratified=stratified, device=x0.device, generator=gen)
    full = torch.zeros(global_rows, length, dtype=x0.dtype, device=x0.device)
    full[row_offset : row_offset + rows] = x0
    total, rate = noise(t)
    # The whole global batch is noised (tokens outside this rank's rows are placeholders), so each
    # row's random draws are the same whichever rank holds it.
    x_t = graph.sample_transition(full, total, generator=gen)[row_offset : row_offset + rows]
    sl = slice(row_offset, row_offset + rows)
    if given is None:
        return NoisedBatch(x0=x0, x_t=x_t, total_noise=total[sl], rate=rate[sl])
    if given.shape != x0.shape:
        raise ValueError(f"the prompt mask {tuple(given.shape)} must be shaped like the tokens {tuple(x0.shape)}")
    given = given.to(x0.device, torch.bool)
    x_t = torch.where(given, x0, x_t)
    weight = rate[sl][:, None] * (~given).to(rate.dtype)
    return NoisedBatch(x0=x0, x_t=x_t, total_noise=total[sl], rate=weight)
