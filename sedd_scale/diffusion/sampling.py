"""Reverse-diffusion samplers driven by any log-score function (sedd-math section 5).

The time grid and noise levels are float64; categorical draws are an exponential race in float64
(a float32 uniform truncates the Gumbel tail and lowers the effective temperature, sedd-math 9.4).
Weights that come out negative (large Euler steps, an over-confident model) count as zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .graph import Graph
from .loss import LogScoreFn
from .noise import Noise

_RACE_CHUNK = 1 << 22  # float64 elements per chunk of the race: bounds its extra memory to 32 MiB


def sample_categorical(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Index drawn with probability proportional to max(w, 0) along the last dim (float64 race)."""
    vocab = weights.shape[-1]
    flat = weights.reshape(-1, vocab)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=weights.device)
    rows = max(1, _RACE_CHUNK // vocab)
    for start in range(0, flat.shape[0], rows):
        w = flat[start : start + rows].to(torch.float64).clamp_min(0.0)
        if bool((w.sum(-1) <= 0).any()):
            raise FloatingPointError("sampler weights are all zero at some position (scores underflowed or NaN)")
        race = torch.empty_like(w).exponential_(generator=generator)
        out[start : start + rows] = (w / race).argmax(-1)
    return out.reshape(weights.shape[:-1])


@dataclass
class Infill:
    """Clamp given tokens at given positions (prefix, suffix or any template) during sampling.

    The unconditional ratios serve the conditional because p_t(z' + y)/p_t(z + y) is the ratio of
    p_t(. | y) when y are the tokens *at noise level t* (sedd-math 5). Under the absorbing graph an
    unmasked token is the clean token, so clamping samples the exact conditional given clean y.
    Under the uniform graph a token at noise level t is only evidence of the clean one, so clamping
    is the paper's heuristic (Alg. 3), not the exact conditional.
    """

    positions: Tensor  # bool, (L,) or (B, L): True where the token is given
    tokens: Tensor  # long, same shape: the given ids (ignored where positions is False)

    def __post_init__(self):
        if self.positions.shape != self.tokens.shape or self.positions.dtype != torch.bool:
            raise ValueError("Infill needs a bool `positions` and a `tokens` tensor of the same shape")

    @classmethod
    def from_template(cls, template: list[int | None]) -> "Infill":
        """From a list with token ids where given and None at the blanks."""
        return cls(torch.tensor([t is not None for t in template]),
                   torch.tensor([0 if t is None else t for t in template], dtype=torch.long))

    @classmethod
    def prefix_suffix(cls, length: int, prefix: list[int] = (), suffix: list[int] = ()) -> "Infill":
        """Given tokens at the start and/or the end of a sequence of `length`."""
        if len(prefix) + len(suffix) > length:
            raise ValueError(f"prefix ({len(prefix)}) + suffix ({len(suffix)}) exceed the length {length}")
        middle: list[int | None] = [None] * (length - len(prefix) - len(suffix))
        return cls.from_template([*prefix, *middle, *suffix])

    def __call__(self, x: Tensor) -> Tensor:
        """x with the given tokens written in."""
        return torch.where(self.positions.to(x.device), self.tokens.to(x.device), x)


def _scores(log_score_fn: LogScoreFn, graph: Graph, x: Tensor, total: Tensor) -> Tensor:
    return log_score_fn(x, total)[..., : graph.dim].exp()


def euler_step(log_score_fn: LogScoreFn, graph: Graph, noise: Noise, x: Tensor, t: Tensor, dt: float,
               generator: torch.Generator | None = None) -> Tensor:
    """tau-leaping with the reverse rates: w = onehot(x) + dt sigma(t) R(x, s)."""
    total, rate = noise(t)
    weights = graph.reverse_rate(x, _scores(log_score_fn, graph, x, total))
    weights.mul_((dt * rate).to(weights.dtype)[:, None, None])
    weights.scatter_add_(-1, x.unsqueeze(-1), torch.ones_like(weights[..., :1]))
    return sample_categorical(weights, generator)


def analytic_step(log_score_fn: LogScoreFn, graph: Graph, noise: Noise, x: Tensor, t: Tensor, dt: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """Tweedie tau-leaping: w_y = [exp(-dsigma Q) s]_y exp(dsigma Q)[x, y], dsigma = sigma_bar(t) - sigma_bar(t - dt)."""
    total = noise.total_noise(t)
    dsigma = total - noise.total_noise(t - dt)
    staggered = graph.staggered_score(_scores(log_score_fn, graph, x, total), dsigma)
    return sample_categorical(staggered * graph.transp_transition(x, dsigma), generator)


def denoise_step(log_score_fn: LogScoreFn, graph: Graph, noise: Noise, x: Tensor, t: Tensor,
                 generator: torch.Generator | None = None) -> Tensor:
    """The final jump from sigma_bar(t) to noise 0 (analytic rule); absorbing MASK is never kept."""
    total = noise.total_noise(t)
    staggered = graph.staggered_score(_scores(log_score_fn, graph, x, total), total)
    weights = staggered * graph.transp_transition(x, total)
    if graph.absorb:
        weights[..., graph.mask] = 0.0
    return sample_categorical(weights, generator)


@torch.no_grad()
def sample(log_score_fn: LogScoreFn, graph: Graph, noise: Noise, shape: tuple[int, int], *, steps: int,
           predictor: Literal["euler", "analytic"] = "analytic", eps: float = 1e-5, denoise: bool = True,
           infill: Infill | None = None, device=None, generator: torch.Generator | None = None) -> Tensor:
    """Draw (B, L) sequences: from the limit, `steps` predictor steps on linspace(1, eps), then denoise."""
    steps_fn = {"euler": euler_step, "analytic": analytic_step}
    if predictor not in steps_fn:
        raise ValueError(f"unknown predictor {predictor!r}; choose one of {sorted(steps_fn)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    clamp = infill if infill is not None else (lambda x: x)
    x = graph.sample_limit(*shape, device=device, generator=generator)
    grid = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64, device=x.device)
    dt = (1.0 - eps) / steps
    for k in range(steps):
        t = grid[k].expand(shape[0])
        x = steps_fn[predictor](log_score_fn, graph, noise, clamp(x), t, dt, generator)
    if denoise:
        x = denoise_step(log_score_fn, graph, noise, clamp(x), grid[-1].expand(shape[0]), generator)
    return clamp(x)
