"""The unfused reference objective: sigma-weighted denoising score entropy summed over positions (sedd-math 2.2),
from full-vocabulary log-scores. Training uses the fused vocab-parallel head (`sedd_scale/loss/`); the tests
use this one as its oracle."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .graph import Graph
from .noise import Noise, sample_times

LogScoreFn = Callable[[Tensor, Tensor], Tensor]
"""(x_t (B, L), total_noise (B,)) -> log-scores (B, L, >= graph.dim); entries past graph.dim are padding."""


@dataclass
class LossOutput:
    """Per-sequence losses (nats, ~L x nats/token) and their per-token means; `loss` is what to backprop."""

    loss: Tensor
    per_sequence: Tensor
    per_token: Tensor


def score_entropy_loss(log_score_fn: LogScoreFn, graph: Graph, noise: Noise, x0: Tensor, *,
                       sampling_eps: float = 1e-3, stratified: bool = False, t: Tensor | None = None,
                       generator: torch.Generator | None = None) -> LossOutput:
    """One-sample Monte-Carlo DWDSE per sequence: sum_i sigma(t) score_entropy_i, t ~ U[eps, 1]."""
    if x0.dim() != 2:
        raise ValueError(f"x0 must be (batch, length) token ids, got shape {tuple(x0.shape)}")
    if t is None:
        t = sample_times(x0.shape[0], eps=sampling_eps, stratified=stratified, device=x0.device, generator=generator)
    total, rate = noise(t)
    x_t = graph.sample_transition(x0, total, generator=generator)
    log_score = log_score_fn(x_t, total)[..., : graph.dim]
    per_token_se = graph.score_entropy(log_score, total, x_t, x0)
    per_sequence = (rate.to(per_token_se.dtype)[:, None] * per_token_se).sum(-1)
    return LossOutput(loss=per_sequence.mean(), per_sequence=per_sequence, per_token=per_sequence / x0.shape[1])
