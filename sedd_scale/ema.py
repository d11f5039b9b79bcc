"""Exponential moving average of the weights, with the reference's warm-up (sedd-math 6).

It holds an fp32 shadow of whatever tensors it is given: each rank passes its own shards (TP/PP
slices, or ZeRO-3 partitions), so the EMA is sharded exactly like the parameters.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor


class EMA:
    """shadow <- d shadow + (1 - d) param, d = min(decay, (1 + n) / (10 + n)), n = updates so far."""

    def __init__(self, params: Sequence[Tensor], decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.num_updates = decay, 0
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self, params: Sequence[Tensor]) -> None:
        """Fold the current parameters in (call after each optimizer step)."""
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, params, strict=True):
            s.mul_(d).add_(p.detach().float(), alpha=1.0 - d)
        self.num_updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self, params: Sequence[Tensor]) -> Iterator[None]:
        """Temporarily load the averaged weights into `params` (evaluation, sampling)."""
        saved = [p.detach().clone() for p in params]
        for s, p in zip(self.shadow, params, strict=True):
            p.copy_(s)
        try:
            yield
        finally:
            for b, p in zip(saved, params, strict=True):
                p.copy_(b)

    def state_dict(self) -> dict:
        """Shadow tensors and the update count."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`, checking that the shards match."""
        shapes = [tuple(t.shape) for t in state["shadow"]]
        if shapes != [tuple(t.shape) for t in self.shadow]:
            raise ValueError(f"EMA state holds {len(shapes)} tensors of other shapes than this model's "
                             f"{len(self.shadow)}: was it saved under another layout?")
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = [t.float().clone() for t in state["shadow"]]
