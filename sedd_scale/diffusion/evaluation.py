"""The ELBO over a dataset (an upper bound on its perplexity), through any layout, the same for any DP size.

Per sequence (sedd-math 3): the prior KL plus the integral over total noise from 0 of
sum_i score entropy. Each batch's `draws` t per sequence form R independent replicates
(`diffusion.elbo.replicate_split`), each a stratified (optionally antithetic) design
(`diffusion.elbo.noise_draws`): the batch's estimate is their mean and their spread its
Monte-Carlo variance. Each batch is a group of the data-sampling error (`ElboEstimate.data_stderr`).
Batch b of the data (EvalLoader's global index) draws its noise from a generator seeded by
(seed, b); each data-parallel rank evaluates its own batches and the per-batch results are gathered
and added in batch order. The result depends on the seed and the micro-batch size, never on how
many DP ranks share the work.

Conditional batches (`.given`, prompt/response data) are evaluated as the conditional bound
(`diffusion.elbo`): prompt positions held clean and weighted 0, the prior over the response alone,
and the tokens counted are the response positions, so the bound is per response token.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sedd_scale.diffusion import ElboEstimate, prior_kl
from sedd_scale.diffusion.elbo import noise_draws, replicate_split
from sedd_scale.diffusion.graph import Graph
from sedd_scale.diffusion.noise import Noise

# (x0, x_t, total_noise, rate) -> mean over the batch's rows of sum_i rate_i * score entropy_i (rate (B,) per row, or
# (B, L) per token)
BatchLoss = Callable[[Tensor, Tensor, Tensor, Tensor], float]


@dataclass(frozen=True)
class BatchResult:
    """One batch's share of the bound: nats summed over its real rows, the MC variance of that sum, counts."""

    index: int
    nats: float
    variance: float
    tokens: int
    sequences: int


def batch_generator(seed: int, index: int, device) -> torch.Generator:
    """The noise generator of global batch `index` (a function of the seed and the index only)."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 0x9E3779B1 + (index + 1) * 0x85EBCA77) % (1 << 63))
    return gen


@torch.no_grad()
def batch_elbo(loss: BatchLoss, graph: Graph, noise: Noise, x0: Tensor, valid: Tensor, *, draws: int,
               antithetic: bool, generator: torch.Generator, replicates: int | None = None,
               given: Tensor | None = None) -> tuple[float, float]:
    """(nats summed over the valid rows, MC variance of that sum); padding rows get rate 0 and count nothing.
    `given` (bool, like x0): prompt positions, held clean and weighted 0, and left out of the prior."""
    rows, mask = x0.shape[0], valid.to(x0.device, torch.float64)
    if given is not None:
        given = given.to(x0.device, torch.bool)
        free = (~given).to(torch.float64)
    count, per_replicate = replicate_split(draws, replicates)
    totals = []
    for _ in range(count):  # independent replicates: the generator moves on
        total = 0.0
        for piece in noise_draws(noise, rows, per_replicate, device=x0.device, generator=generator,
                                 antithetic=antithetic):
            means = []
            for total_noise, weight in piece:
                x_t = graph.sample_transition(x0, total_noise, generator=generator)
                rate = weight * mask
                if given is not None:  # every position was drawn: the free ones get the noise they get without it
                    x_t, rate = torch.where(given, x0, x_t), rate[:, None] * free
                means.append(loss(x0, x_t, total_noise.float(), rate.float()))
            total += rows * float(torch.tensor(means, dtype=torch.float64).mean())
        totals.append(total)
    replicate_nats = torch.tensor(totals, dtype=torch.float64)
    prior = float((prior_kl(graph, noise, x0, given) * mask).sum())
    return prior + float(replicate_nats.mean()), float(replicate_nats.var()) / count


def evaluate(loss: BatchLoss, graph: Graph, noise: Noise, batches: Iterable, *, draws: int, antithetic: bool = True,
             seed: int = 0, device=None, dp_group=None, progress: Callable[[int], None] | None = None,
             replicates: int | None = None) -> ElboEstimate:
    """The bound over `batches` (objects with .tokens, .valid, .index, optionally .given) of this rank, combined over
    `dp_group`; tokens counted are the scored positions of the valid rows (the response where `.given` is set).

    Raises ValueError when no batch holds a valid row (on every rank alike: the check follows the gather).
    """
    replicate_split(draws, replicates)  # bad draws/replicates fail before any work
    mine = []
    for batch in batches:
        x0, valid = batch.tokens.to(device), batch.valid.to(device)
        given = getattr(batch, "given", None)
        given = None if given is None else given.to(x0.device, torch.bool)
        n = int(valid.sum())
        if n:
            nats, variance = batch_elbo(loss, graph, noise, x0, valid, draws=draws, antithetic=antithetic,
                                        generator=batch_generator(seed, batch.index, x0.device), replicates=replicates,
                                        given=given)
            tokens = n * x0.shape[1] if given is None else int((~given[valid.bool()]).sum())
            mine.append(BatchResult(batch.index, nats, variance, tokens, n))
        if progress is not None:
            progress(1)
    results = mine
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        everyone: list = [None] * dist.get_world_size(dp_group)
        dist.all_gather_object(everyone, mine, group=dp_group)
        results = [r for part in everyone for r in part]
    results.sort(key=lambda r: r.index)  # a fixed order of float64 additions: the same sum for any DP size
    if len({r.index for r in results}) != len(results):
        raise ValueError("two ranks evaluated the same batch index: batches must be partitioned over DP ranks")
    if not results:
        raise ValueError("no sequence to evaluate: the batches hold no valid rows (an empty split?)")
    return ElboEstimate(sum(r.nats for r in results), sum(r.variance for r in results),
                        sum(r.tokens for r in results), sum(r.sequences for r in results),
                        tuple((r.nats, r.tokens) for r in results))
