"""How one sequence is split across ranks: sequence parallelism (TP group) and context parallelism (CP group).

The network runs sequence-first, (L, B, H), so both splits cut the first dimension (megatron-core's convention).

Context parallelism (`parallel.context_parallel`, DeepSpeed-Ulysses): rank r of a CP group holds the contiguous
chunk [r L/cp, (r + 1) L/cp) of every sequence through the whole network. Every layer but attention is per
position; attention trades the chunk for heads (one all-to-all each for q, k and v), attends over the whole sequence
with n_heads / (tp * cp) heads, and trades back. Models take whole sequences and cut their chunk themselves
(`local`), so data, noise and labels are those of CP 1; `SEDD.forward` gathers its output over CP. Weights are
replicated over CP: DeepSpeed treats CP ranks as data-parallel (gradients averaged over DP x CP), so the training
loss of a chunk is multiplied by cp (Megatron's `loss * cp_size`).

Sequence parallelism (`parallel.sequence_parallel`, megatron-core): inside a TP group the activations between the
tensor-parallel GEMMs (norms, modulation, dropout, residual stream) are split along the sequence, TP times fewer
per rank. Column-parallel layers all-gather their input along the sequence (backward: reduce-scatter),
row-parallel ones reduce-scatter their output instead of all-reducing it. A replicated parameter that acts on a
sequence shard (norm weights, the adaLN modulation, the MLP-out bias) sees only its rank's positions, so its
gradient is summed over TP on the spot (`tp_summed`: identity forward, all-reduce backward), which keeps every
optimizer and ZeRO stage unaware of SP. Dropout on a shard draws from megatron's per-TP-rank stream.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import sedd_scale.compat  # noqa: F401  (before megatron.core)

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from torch import Tensor


@dataclass(frozen=True)
class SequenceSplit:
    """This rank's share of a sequence: its CP chunk, split again over TP under sequence parallelism."""

    sequence_parallel: bool = False
    tp: int = 1
    cp: int = 1
    cp_rank: int = 0

    @classmethod
    def current(cls, sequence_parallel: bool = False) -> "SequenceSplit":
        """The split of megatron-core's groups (SP needs TP > 1: alone it would split nothing)."""
        tp = ps.get_tensor_model_parallel_world_size()
        if sequence_parallel and tp == 1:
            raise ValueError("sequence parallelism splits activations over the tensor-parallel group, which has one "
                             "rank: set parallel.tp > 1 or parallel.sequence_parallel: false")
        return cls(sequence_parallel, tp, ps.get_context_parallel_world_size(), ps.get_context_parallel_rank())

    def check_length(self, length: int) -> None:
        """Raise unless a sequence of `length` splits evenly over CP (and over TP within a chunk under SP)."""
        parts = self.cp * (self.tp if self.sequence_parallel else 1)
        if length % parts:
            what = f"context_parallel={self.cp}" + (f" x tp={self.tp} (sequence parallel)"
                                                    if self.sequence_parallel else "")
            raise ValueError(f"sequence length {length} does not split over {what} = {parts} ranks: use a length "
                             f"divisible by {parts}")

    def local_length(self, length: int) -> int:
        """Positions of a `length` sequence one rank holds between the TP GEMMs."""
        self.check_length(length)
        return length // self.cp // (self.tp if self.sequence_parallel else 1)

    def local(self, t: Tensor, dim: int = 1) -> Tensor:
        """This rank's CP chunk of `t` along `dim` (t itself under CP 1)."""
        if self.cp == 1:
            return t
        self.check_length(t.shape[dim])
        n = t.shape[dim] // self.cp
        return t.narrow(dim, self.cp_rank * n, n)

    def tp_summed(self, t: Tensor) -> Tensor:
        """`t`, whose gradient is summed over TP under SP (a replicated tensor used on a sequence shard)."""
        return tensor_parallel.copy_to_tensor_model_parallel_region(t) if self.sequence_parallel else t

    def gather_sp(self, x: Tensor) -> Tensor:
        """Sequence-first SP shards -> the CP chunk (all-gather over TP; backward reduce-scatters: each rank's
        gradient holds its own vocabulary shard's share only)."""
        if not self.sequence_parallel:
            return x
        return tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True)

    def gather_cp(self, x: Tensor) -> Tensor:
        """Sequence-first CP chunks -> whole sequences (all-gather over CP; backward keeps this rank's chunk)."""
        if self.cp == 1:
            return x
        return tensor_parallel.gather_from_sequence_parallel_region(
            x.contiguous(), tensor_parallel_output_grad=False, group=ps.get_context_parallel_group())

    def sum_cp(self, t: Tensor) -> Tensor:
        """A copy of `t` summed over the CP group (no autograd: per-sequence records and losses of the chunks); `t`
        itself under CP 1."""
        if self.cp == 1:
            return t
        t = t.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t, group=ps.get_context_parallel_group())
        return t

    def dropout_rng(self):
        """The RNG context of dropout on a sequence shard: megatron's per-TP-rank stream under SP (the default
        stream, equal on TP ranks, would repeat one mask on every shard), else none."""
        if self.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()


def ulysses(local_attention: torch.nn.Module, split: SequenceSplit) -> torch.nn.Module | None:
    """DeepSpeed-Ulysses around `local_attention` over the CP group (None under CP 1): sequence-first q, k, v of a
    chunk and all local heads in, of the whole sequence and heads / cp to `local_attention`, and back."""
    if split.cp == 1:
        return None
    from deepspeed.sequence.layer import DistributedAttention  # here: inference at CP 1 never imports DeepSpeed

    # scatter_idx 2 = heads, gather_idx 0 = sequence: the (L, B, heads, D) layout.
    return DistributedAttention(local_attention, ps.get_context_parallel_group(), scatter_idx=2, gather_idx=0)
