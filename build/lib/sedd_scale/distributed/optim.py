"""AdamW that skips a step whose gradients are not finite, judged by the global gradient norm, and its counters."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sedd_scale.distributed import optim_state


def is_finite_norm(norm: float | Tensor) -> bool:
    """Whether a global gradient norm is usable: finite and not DeepSpeed's -1 'invalid norm' sentinel."""
    value = float(norm)
    return math.isfinite(value) and value >= 0.0


class SkipGuard:
    """Mixin for an AdamW class: its update is skipped, on every rank alike, when some gradient is NaN or infinite.

    The test is the global gradient norm that DeepSpeed computes for clipping anyway (over TP, PP and DP):
    sqrt(sum g^2) is NaN or infinite exactly when some g is (finite gradients whose norm passes float32's
    range, ~1.8e19, count as non-finite too: such a step is meaningless). So no per-parameter check and
    no extra collective are needed: the norm is the same number on every rank.

    * Without a ZeRO/bf16 wrapper (ZeRO-0, fp32 parameters) DeepSpeed calls `step()` directly; the engine
      sets `grad_norm` (`engine.build_engine`), and a non-finite norm makes `step()` a no-op that sets
      `overflow`, which DeepSpeed's engine reads like its wrappers' flag (the step is not applied and the
      LR schedule does not advance).
    * DeepSpeed's ZeRO-1/2/3 and bf16 optimizers test the same norm themselves and do not call `step()`
      on a skipped step.

    Either way the engine knows (`was_step_applied()`), and the trainer reports each optimizer step to
    `record`, which keeps `last_skipped`, `skipped_in_a_row` and `skipped_total`.

    Its state dict is marked with where it keeps the step count, and it loads a state saved by either AdamW
    implementation (`optim_state`): a run trained with apex resumes without it and the reverse.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.last_skipped = False
        self.overflow = False
        # () -> this step's global gradient norm; None when a DeepSpeed wrapper checks the norm itself.
        self.grad_norm: Callable[[], float | Tensor] | None = None

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step, unless the global gradient norm is not finite."""
        self.overflow = self.grad_norm is not None and not is_finite_norm(self.grad_norm())
        if self.overflow:
            return None
        return super().step(closure)

    def state_dict(self):
        """The optimizer's state, marked with its layout (step per parameter or per group)."""
        return optim_state.convert(super().state_dict(), optim_state.layout_of_class(type(self)))

    def load_state_dict(self, state_dict):
        """Load a state saved by torch's AdamW or a FusedAdam, converted to this optimizer's layout."""
        layout = optim_state.layout_of_class(type(self))
        super().load_state_dict(optim_state.convert(state_dict, layout, self.param_groups))

    def record(self, applied: bool) -> None:
        """Count the optimizer step that just ended: applied, or skipped for non-finite gradients."""
        self.last_skipped = not applied
        if applied:
            self.skipped_in_a_row = 0
        else:
            self.skipped_in_a_row += 1
            self.skipped_total += 1


class GuardedAdamW(SkipGuard, torch.optim.AdamW):
    """torch AdamW under the non-finite guard."""


def guarded(adam_class: type) -> type:
    """`adam_class` (torch's AdamW or apex's FusedAdam, see `accelerators`) under the non-finite guard."""
    if adam_class is torch.optim.AdamW:
        return GuardedAdamW
    return type(f"Guarded{adam_class.__name__}", (SkipGuard, adam_class), {})
