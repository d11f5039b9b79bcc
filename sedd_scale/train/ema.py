"""Exponential moving average of the weights, sharded over the data-parallel group (sedd-math 6): DeepSpeed's,
DP x CP under context parallelism (the trainer passes it), whose ranks ZeRO partitions over.

Data-parallel replicas hold the same weights, so each DP rank averages only its part of every
parameter: elements [r*c, (r+1)*c) of the flattened tensor, c = ceil(numel / dp), the rule ZeRO-3
partitions by (a ZeRO-3 parameter's own partition is used as it is). The shadow is one flat fp32
buffer per rank: memory and checkpoint bytes for the EMA fall by the DP degree, and the whole
average exists only while `applied` (evaluation, sampling) all-gathers it.

The parameters given are this rank's tensor/pipeline shards; the layout of the shards over DP is
recorded in `state_dict()` so that tools can join them without the training job.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from sedd_scale.distributed.deepspeed_files import zero3_partitioned
from sedd_scale.layout import shard_bounds


def _numel(p: Tensor) -> int:
    return p.ds_numel if zero3_partitioned(p) else p.numel()


class EMA:
    """shadow <- d shadow + (1 - d) param, d = min(decay, (1 + n) / (10 + n)), n = updates so far."""

    def __init__(self, params: Sequence[Tensor], decay: float = 0.9999, *, dp_rank: int = 0, dp_size: int = 1,
                 group=None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got {dp_rank}, {dp_size}")
        self.decay, self.num_updates = decay, 0
        self.dp_rank, self.dp_size, self.group = dp_rank, dp_size, group
        self.numels = [_numel(p) for p in params]
        self.chunks = [math.ceil(n / dp_size) for n in self.numels]  # each shard's padded length
        self.offsets = [0]
        for c in self.chunks:
            self.offsets.append(self.offsets[-1] + c)
        device = params[0].device if params else torch.device("cpu")
        self.shadow = torch.zeros(self.offsets[-1], dtype=torch.float32, device=device)
        with torch.no_grad():
            for s, src in zip(self.shards, self._sources(params), strict=True):
                s.copy_(src)

    @property
    def shards(self) -> list[Tensor]:
        """This rank's shard of each parameter's average (views into the flat shadow, without padding)."""
        out = []
        for i, n in enumerate(self.numels):
            start, end = shard_bounds(n, self.dp_rank, self.dp_size)
            out.append(self.shadow[self.offsets[i]: self.offsets[i] + end - start])
        return out

    def _sources(self, params: Sequence[Tensor]) -> list[Tensor]:
        """This rank's elements of each parameter, flat (views: writing them writes the parameter)."""
        if len(params) != len(self.numels):
            raise ValueError(f"EMA built for {len(self.numels)} parameters, given {len(params)}")
        out = []
        for p, n in zip(params, self.numels):
            start, end = shard_bounds(n, self.dp_rank, self.dp_size)
            out.append(p.ds_tensor.data.view(-1)[: end - start] if zero3_partitioned(p) else p.data.view(-1)[start:end])
        return out

    @torch.no_grad()
    def update(self, params: Sequence[Tensor]) -> None:
        """Fold the current parameters in (call after each optimizer step)."""
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        shards = self.shards
        torch._foreach_mul_(shards, d)
        torch._foreach_add_(shards, [s.float() for s in self._sources(params)], alpha=1.0 - d)
        self.num_updates += 1

    def _gathered(self) -> Tensor:
        """Every DP rank's flat shadow, (dp_size, padded length); a collective over the DP group."""
        if self.dp_size == 1:
            return self.shadow.view(1, -1)
        out = torch.empty(self.dp_size * self.shadow.numel(), dtype=self.shadow.dtype, device=self.shadow.device)
        dist.all_gather_into_tensor(out, self.shadow, group=self.group)  # gloo wants a flat output
        return out.view(self.dp_size, -1)

    def whole(self, gathered: Tensor, index: int) -> Tensor:
        """Parameter `index`'s whole flat average from `_gathered()`'s result."""
        start = self.offsets[index]
        return gathered[:, start: start + self.chunks[index]].reshape(-1)[: self.numels[index]]

    def whole_tensors(self) -> list[Tensor]:
        """Every parameter's whole flat average (fp32); a collective over the DP group."""
        gathered = self._gathered()
        return [self.whole(gathered, i) for i in range(len(self.numels))]

    @torch.no_grad()
    def set_whole(self, index: int, value: Tensor) -> None:
        """Set parameter `index`'s average from its whole tensor (this rank keeps its shard; no collective)."""
        start, end = shard_bounds(self.numels[index], self.dp_rank, self.dp_size)
        self.shards[index].copy_(value.reshape(-1)[start:end])

    @contextmanager
    @torch.no_grad()
    def applied(self, params: Sequence[Tensor]) -> Iterator[None]:
        """Temporarily load the averaged weights into `params` (evaluation, sampling; a DP collective)."""
        gathered = None if all(zero3_partitioned(p) for p in params) else self._gathered()
        saved = [(p.ds_tensor if zero3_partitioned(p) else p).detach().clone() for p in params]
        for i, (p, src) in enumerate(zip(params, self._sources(params), strict=True)):
            if zero3_partitioned(p):  # the module reads its own partition
                src.copy_(self.shards[i])
            else:
                p.copy_(self.whole(gathered, i).view_as(p))
        try:
            yield
        finally:
            for b, p in zip(saved, params, strict=True):
                (p.ds_tensor if zero3_partitioned(p) else p).copy_(b)

    def state_dict(self) -> dict:
        """This rank's shard, the update count and how the shards are laid out over DP."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "numels": list(self.numels)}

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's shard from `state_dict()`, checking that it belongs to the same layout."""
        if state.get("numels") != self.numels or state.get("dp_size") != self.dp_size \
                or state.get("dp_rank") != self.dp_rank:
            raise ValueError(f"EMA state of DP rank {state.get('dp_rank')}/{state.get('dp_size')} over "
                             f"{len(state.get('numels') or [])} tensors does not fit DP rank {self.dp_rank}/"
                             f"{self.dp_size} over this model's {len(self.numels)}: was it saved under another "
                             "layout?")
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = state["shadow"].to(self.shadow.device, torch.float32).clone()
