"""Reuse: tau-leaping that skips the network for a sequence none of whose tokens changed since its last evaluation.

Under the absorbing graph most steps of a long grid change nothing in a sequence (at S steps over L
positions, a step unmasks about L/S tokens), and the network's token input is then the same as at the
last evaluation; only its noise level differs. The cached sampler evaluates the network on the
sequences that changed (a sub-batch) and, for the others, reuses their last log-scores with the
absorbing `scale_by_sigma` factor moved to the new noise level:

    log s(x, sigma_new)_y = log s(x, sigma_old)_y + log(e^sigma_old - 1) - log(e^sigma_new - 1)  (y != x),

the entry at the current token staying 0 (sedd-math 4: the absorbing parametrisation is
f_theta(x, sigma) - log(e^sigma - 1) - log N). This is exact when the network's output before that
shift does not depend on sigma: the true absorbing scores have exactly this form (s_y = p_0(y | unmasked
context) / (e^sigma - 1), sedd-math 4), so the exact oracle and MDLM-style time-independent denoisers
sample exactly what the uncached sampler samples (the same draws from the same generator, up to the
rounding of the shift in the last bit). A SEDD network is conditioned on sigma through adaLN, so for it
the reuse is approximate: the rescale is exact, the network's sigma-conditioning is stale by the
steps since the sequence last changed. Under the uniform graph there is no such closed form and the
scores are reused unchanged (approximate for any model; rarely triggered, since every token can move).

The draws (one float64 uniform per position and step) are exactly those of `sample`, so with a
sigma-independent model the tokens equal the uncached sampler's; NFE (evaluations per sequence) drops
to 1 + the number of steps at which the sequence changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..graph import Graph
from ..parametrization import log_expm1
from ..reference_loss import LogScoreFn
from ..sampling import sample
from .registry import Sampler, sampler


class ScoreCache:
    """A log-score function that evaluates only the sequences whose tokens changed since their last evaluation."""

    def __init__(self, log_score_fn: LogScoreFn, graph: Graph):
        self.log_score_fn, self.graph = log_score_fn, graph
        self.x: Tensor | None = None  # tokens at each sequence's last evaluation
        self.log_score: Tensor | None = None  # its log-scores then
        self.total: Tensor | None = None  # and its total noise then

    def __call__(self, x: Tensor, total: Tensor) -> Tensor:
        """Log-scores of x at `total`: fresh for changed sequences, rescaled from the cache for the others."""
        if self.x is None or self.x.shape != x.shape:
            own = torch.contiguous_format  # `total` may be an expanded view: the cache writes rows into its copy
            self.x, self.total = x.clone(memory_format=own), total.clone(memory_format=own)
            self.log_score = self.log_score_fn(x, total).clone(memory_format=own)
            return self.log_score
        changed = (x != self.x).any(1)
        if bool(changed.any()):
            rows = changed.nonzero().squeeze(1)
            self.log_score[rows] = self.log_score_fn(x[rows], total[rows]).to(self.log_score.dtype)
            self.x[rows], self.total[rows] = x[rows], total[rows]
        if not self.graph.absorb:
            return self.log_score
        stale = self.total != total
        if not bool(stale.any()):
            return self.log_score
        dtype = self.log_score.dtype
        shift = (log_expm1(self.total.double()) - log_expm1(total.double())).to(dtype)
        shift = torch.where(stale, shift, torch.zeros_like(shift)).reshape(-1, 1, 1)
        out = self.log_score + shift
        return out.scatter_(-1, x.unsqueeze(-1), 0.0)  # the ratio of a state to itself stays 1


@sampler("cached")
@dataclass
class Cached(Sampler):
    """Tau-leaping (`predictor`) with the network reused for unchanged sequences (`ScoreCache`)."""

    predictor: Literal["analytic", "euler"] = "analytic"
    exactness = ("absorb: exact (the same tokens as the uncached predictor) when the network's output before the "
                 "scale_by_sigma shift ignores sigma (exact scores, MDLM-style denoisers); for a sigma-conditioned "
                 "SEDD network the reused output's sigma-conditioning is stale (the rescale is exact)")

    def run(self, score, graph, noise, shape, *, steps, eps, denoise, infill, device, generator):
        """`sampling.sample` through a `ScoreCache`."""
        return sample(ScoreCache(score, graph), graph, noise, shape, steps=steps, predictor=self.predictor, eps=eps,
                      denoise=denoise, infill=infill, device=device, generator=generator)
