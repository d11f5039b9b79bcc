"""AdamW that skips a step whose gradients are not finite anywhere (every rank skips together)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW; `step()` is a no-op, counted, when any rank holds a NaN/inf gradient.

    DeepSpeed calls the wrapped optimizer on every rank at the same optimizer step (on the ZeRO
    partitions it owns), so the flag is all-reduced over the whole world and all ranks agree.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.last_skipped = False

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step, unless some gradient is not finite."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        bad = torch.zeros((), device=device)
        for grad in grads:
            bad = torch.maximum(bad, (~torch.isfinite(grad)).any().to(bad.dtype))
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.last_skipped = bool(bad)
        if self.last_skipped:
            self.skipped_in_a_row += 1
            self.skipped_total += 1
            return None
        self.skipped_in_a_row = 0
        return super().step(closure)
