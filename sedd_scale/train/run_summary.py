"""What a run says about itself at start (printed on rank 0, recorded in tensorboard and W&B): the parameter count
(total, per pipeline stage, per rank), the tokens per optimizer step and the layout."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sedd_scale.distributed.deepspeed_files import zero3_partitioned


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of the whole network, of each pipeline stage (all its TP shards, replicated tensors once) and the
    most one rank holds (its TP shard of a stage, before ZeRO partitions it over DP)."""

    total: int
    per_stage: list[int]
    per_rank: int


def _numel(p: torch.Tensor) -> int:
    return p.ds_numel if zero3_partitioned(p) else p.numel()


def parameter_counts(params, *, tp_rank: int, pp_rank: int, dp_rank: int) -> ParameterCounts:
    """Count the network's parameters from every rank's `params` (a collective over the world).

    A tensor megatron splits over TP carries `tensor_model_parallel`; any other one (norms, adaLN, replicated
    biases) is the same on every TP rank and is counted on TP rank 0 only."""
    params = list(params)
    held = sum(_numel(p) for p in params)
    unique = sum(_numel(p) for p in params if getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
    rows: list = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (pp_rank, dp_rank, held, unique))
    stages = 1 + max(r[0] for r in rows)
    per_stage = [sum(r[3] for r in rows if r[0] == s and r[1] == 0) for s in range(stages)]
    return ParameterCounts(total=sum(per_stage), per_stage=per_stage, per_rank=max(r[2] for r in rows))


def _count(n: int) -> str:
    """1234567 -> '1.23M (1,234,567)'."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit} ({n:,})"
    return str(n)


def start_lines(recipe, layout, counts: ParameterCounts) -> list[str]:
    """The lines rank 0 prints at start: layout, parameters, tokens per optimizer step."""
    stages = "" if len(counts.per_stage) == 1 else \
        f"; per pipeline stage {', '.join(_count(n) for n in counts.per_stage)}"
    shard = "" if layout.tp == 1 and layout.pp == 1 else f"; up to {_count(counts.per_rank)} on one rank"
    over = f"DP x CP {layout.data_group_size}" if layout.cp > 1 else f"DP {layout.dp}"
    zero = f" (ZeRO-{layout.zero_stage} partitions them over {over})" if layout.zero_stage == 3 else ""
    tokens = layout.global_batch * recipe.data.seq_len
    return [f"layout: {layout.describe()}",
            f"parameters: {_count(counts.total)}{stages}{shard}{zero}",
            f"tokens per optimizer step: {tokens:,} (global batch {layout.global_batch} x seq_len "
            f"{recipe.data.seq_len}; {layout.grad_accum} micro-batch(es) of {layout.micro_batch} per rank)"]
