"""Confidence-based parallel unmasking (absorbing graph; LLaDA's low-confidence remasking, Fast-dLLM's threshold).

From all-MASK (given tokens clamped), each step evaluates the network once on the sequences that still
have masked positions, at the total noise whose masking probability equals the sequence's masked
fraction (the level training saw such states at). At each masked position the denoiser's distribution
over real tokens is p_y = s_y / sum_z s_z (the absorbing scores' sigma factor cancels); a candidate
token is drawn from p (float64 inverse CDF) and the position's confidence is max_y p_y. Each sequence
then unmasks its n most confident positions with their candidates, where

    n = max(ceil(masked / steps_left), #{confidence >= threshold}, min(top_k, masked))

(the threshold and top_k terms only when set): the first term finishes every sequence within `steps`
evaluations, so NFE <= steps and no final denoise is needed (`denoise` is ignored). A sequence with
nothing left masked is not evaluated again.

Exactness: the confidence max_y p_y depends only on the tokens already revealed, not on the draw, so
revealing one position per step (steps >= the number of generated positions, no threshold, no top_k)
samples the chain rule p(x) = prod_i p(x_{o_i} | x_{o_<i}) in an adaptive order: exact with exact
scores. Revealing several positions in one step draws them from the product of their marginals,
biased by their dependence; the threshold bounds that bias (Fast-dLLM: positions revealed together
are near-deterministic) while top_k and a small `steps` do not. Given tokens are never masked or changed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..sampling import _check_totals, _chunk_rows, _uniform
from .registry import Sampler, masked_fraction_noise, sampler


def draw_with_confidence(log_score: Tensor, num_tokens: int, generator) -> tuple[Tensor, Tensor]:
    """Per row of log-scores (M, >= num_tokens): a token drawn from softmax over the real tokens, and max_y p_y."""
    rows = log_score.shape[0]
    u = _uniform((rows,), generator, log_score.device)
    token = torch.empty(rows, dtype=torch.long, device=log_score.device)
    confidence = torch.empty(rows, dtype=torch.float64, device=log_score.device)
    total = torch.ones_like(u)
    chunk = _chunk_rows(log_score.device, num_tokens)
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        s = log_score[part, :num_tokens].to(torch.float64, memory_format=torch.contiguous_format, copy=True)
        top = s.max(1, keepdim=True).values
        cum = s.sub_(top).exp_().cumsum_(1)  # the largest weight is exactly 1
        total[part] = cum[:, -1]
        confidence[part] = 1.0 / cum[:, -1]
        token[part] = torch.searchsorted(cum, (u[part] * cum[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    _check_totals(total, "masked positions: the model's log-scores are NaN or infinite there")
    return token.clamp_(max=num_tokens - 1), confidence


@sampler("confidence")
@dataclass
class Confidence(Sampler):
    """Unmask the most confident masked positions each step (see the module docstring)."""

    threshold: float | None = None  # unmask every position whose confidence reaches it (Fast-dLLM)
    top_k: int | None = None  # unmask at least k positions per step (LLaDA-style fixed count)
    graphs = ("absorb",)  # it unmasks positions
    exactness = ("exact with exact scores when one position is revealed per step (steps >= generated positions, "
                 "no threshold/top_k); revealing several per step is biased by their dependence (threshold bounds it)")

    def __post_init__(self):
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"confidence:threshold must be in (0, 1], got {self.threshold}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"confidence:top_k must be >= 1, got {self.top_k}")

    def run(self, score, graph, noise, shape, *, steps, eps, denoise, infill, device, generator):
        """Unmask by confidence within `steps` evaluations."""
        x = graph.sample_limit(*shape, device=device, generator=generator)
        free = torch.ones(shape, dtype=torch.bool, device=x.device)
        if infill is not None:  # clamped positions (given tokens, or MASK held by a block sampler) never move
            x, free = infill(x), free & ~infill.positions.to(x.device)
        length = shape[1]
        rank = torch.arange(length, device=x.device)
        for k in range(steps):
            movable = (x == graph.mask) & free
            count = movable.sum(1)
            active = (count > 0).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            xa, ma, ca = x[active], movable[active], count[active]
            log_score = score(xa, masked_fraction_noise(xa, graph.mask, noise, eps))
            where = ma.nonzero(as_tuple=True)
            token, conf = draw_with_confidence(log_score[where], graph.num_tokens, generator)
            confidence = torch.full(ma.shape, -1.0, dtype=torch.float64, device=x.device)
            confidence[where] = conf
            candidate = xa.clone()
            candidate[where] = token
            n = (ca + (steps - k) - 1) // (steps - k)  # ceil(masked / steps_left)
            if self.threshold is not None:
                n = torch.maximum(n, (confidence >= self.threshold).sum(1))
            if self.top_k is not None:
                n = torch.maximum(n, ca.clamp(max=self.top_k))
            order = torch.argsort(confidence, dim=1, descending=True, stable=True)
            reveal = torch.zeros_like(ma).scatter_(1, order, rank.expand_as(order) < n.unsqueeze(1)) & ma
            x[active] = torch.where(reveal, candidate, xa)
        return x
