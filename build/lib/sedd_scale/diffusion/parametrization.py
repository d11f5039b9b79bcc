"""The network's raw output turned into log-ratios log s(x)_y (sedd-math section 4, post-processing)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def log_expm1(x: Tensor) -> Tensor:
    """log(e^x - 1), accurate for small x (expm1) and large x (no overflow below ~88 in float32)."""
    return torch.where(x > 20.0, x + torch.log1p(-torch.exp(-x)), torch.log(torch.expm1(x.clamp(max=20.0))))


def absorb_shift(total_noise: Tensor, num_tokens: int) -> Tensor:
    """The absorbing `scale_by_sigma` offset log(e^sigma - 1) + log N subtracted from the output."""
    return log_expm1(total_noise) + math.log(num_tokens)


def to_log_score(
    output: Tensor,
    x: Tensor,
    total_noise: Tensor,
    *,
    num_tokens: int,
    graph_dim: int,
    scale_by_sigma: bool,
    vocab_start: int = 0,
) -> Tensor:
    """Raw output (B, L, V_local), a vocabulary shard starting at `vocab_start`, -> log-scores.

    - `scale_by_sigma` (absorbing graph only): subtract log(e^sigma - 1) + log N, so an
      untrained network spreads the true total ratio mass 1/(e^sigma - 1) evenly over N tokens.
    - The entry at the current token x is 0 (the ratio of a state to itself).
    - Vocabulary padding (global index >= graph_dim) is -inf: it is never sampled. Losses must
      still exclude it by index, since 0 * -inf terms are not 0.
    Half-precision outputs are promoted to float32; float64 stays float64.
    """
    if output.dim() != 3 or output.shape[:2] != x.shape:
        raise ValueError(f"output must be (B, L, V_local) matching x {tuple(x.shape)}, got {tuple(output.shape)}")
    out = output.float() if output.dtype in (torch.float16, torch.bfloat16) else output
    if scale_by_sigma:
        sigma = total_noise.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1)))
        out = out - absorb_shift(sigma, num_tokens)
    else:
        out = out.clone()
    local = out.shape[-1]
    idx = x - vocab_start
    inside = (idx >= 0) & (idx < local)
    # Writes into a position of this shard only where x falls into it; elsewhere the write goes to
    # column 0 with the value it already has.
    col = torch.where(inside, idx, torch.zeros_like(idx)).unsqueeze(-1)
    keep = out.gather(-1, col)
    out = out.scatter(-1, col, torch.where(inside.unsqueeze(-1), torch.zeros_like(keep), keep))
    pad_from = graph_dim - vocab_start
    if pad_from < local:
        out[..., max(pad_from, 0):] = float("-inf")
    return out
