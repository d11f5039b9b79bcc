"""The network's raw output turned into log-ratios log s(x)_y (sedd-math section 4, post-processing).

Two parametrizations (`ModelConfig.parametrization`):
- `ratios` (SEDD, score entropy): the output is log s itself, optionally shifted by `scale_by_sigma`.
- `denoiser` (the absorbing graph's masked cross-entropy, `sedd_scale.loss.masked_ce`): the output z is the logits
  of the denoiser p(x0 = y | x_t) over the N real tokens (MASK and padding get no mass), and at a masked position
  the exact absorbing score is log s_y = log_softmax(z)_y - log(e^sigma - 1) (sedd-math 4: s_y =
  p(x0 = y | context) / (e^sigma - 1)). The softmax's normalizer spans every TP shard: one collective.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

PARAMETRIZATIONS = ("ratios", "denoiser")


def log_expm1(x: Tensor) -> Tensor:
    """log(e^x - 1), accurate for small x (expm1) and large x (no overflow below ~88 in float32)."""
    return torch.where(x > 20.0, x + torch.log1p(-torch.exp(-x)), torch.log(torch.expm1(x.clamp(max=20.0))))


def absorb_shift(total_noise: Tensor, num_tokens: int) -> Tensor:
    """The absorbing `scale_by_sigma` offset log(e^sigma - 1) + log N subtracted from the output."""
    return log_expm1(total_noise) + math.log(num_tokens)


def global_logsumexp(local: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """log sum over the TP ranks of e^local (each rank's log-sum-exp over its vocabulary shard, -inf for none), by
    one all-gather; the same bits on every rank. No group (or one rank): `local` itself."""
    if group is None or dist.get_world_size(group) == 1:
        return local
    flat = local.contiguous().reshape(-1)
    out = flat.new_empty(dist.get_world_size(group) * flat.numel())
    dist.all_gather_into_tensor(out, flat, group=group)  # gloo wants a flat output
    return out.view(-1, flat.numel()).logsumexp(0).view(local.shape)


def shard_logsumexp(z: Tensor, n_local: int, group: dist.ProcessGroup | None) -> Tensor:
    """The global log-sum-exp over the last dim of the real-token columns z[..., :n_local] of every TP shard; a shard
    without real tokens (n_local = 0) still joins the collective."""
    if n_local > 0:
        local = torch.logsumexp(z[..., :n_local], dim=-1)
    else:
        local = torch.full(z.shape[:-1], float("-inf"), dtype=z.dtype, device=z.device)
    return global_logsumexp(local, group)


def to_log_score(
    output: Tensor,
    x: Tensor,
    total_noise: Tensor,
    *,
    num_tokens: int,
    graph_dim: int,
    scale_by_sigma: bool,
    vocab_start: int = 0,
    parametrization: str = "ratios",
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Raw output (B, L, V_local), a vocabulary shard starting at `vocab_start`, -> log-scores.

    - `scale_by_sigma` (absorbing graph only): subtract log(e^sigma - 1) + log N, so an
      untrained network spreads the true total ratio mass 1/(e^sigma - 1) evenly over N tokens.
    - `parametrization="denoiser"` (absorbing graph only): subtract the log-sum-exp over the N real tokens of every
      shard of the TP `group` (a collective: call it on every rank of the group) and log(e^sigma - 1). The
      unmasked positions get the same formula; their scores are never read (no absorbing move leaves them).
    - The entry at the current token x is 0 (the ratio of a state to itself).
    - Vocabulary padding (global index >= graph_dim) is -inf: it is never sampled. Losses must
      still exclude it by index, since 0 * -inf terms are not 0.
    Half-precision outputs are promoted to float32; float64 stays float64.
    """
    if output.dim() != 3 or output.shape[:2] != x.shape:
        raise ValueError(f"output must be (B, L, V_local) matching x {tuple(x.shape)}, got {tuple(output.shape)}")
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
    out = output.float() if output.dtype in (torch.float16, torch.bfloat16) else output
    local = out.shape[-1]
    if parametrization == "denoiser":
        if scale_by_sigma or graph_dim != num_tokens + 1:
            raise ValueError("the denoiser parametrization is the absorbing graph's, without scale_by_sigma")
        sigma = total_noise.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1)))
        lse = shard_logsumexp(out, max(0, min(num_tokens - vocab_start, local)), group)
        out = out - (lse.unsqueeze(-1) + log_expm1(sigma))
    elif scale_by_sigma:
        sigma = total_noise.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1)))
        out = out - absorb_shift(sigma, num_tokens)
    else:
        out = out.clone()
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
