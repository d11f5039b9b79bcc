"""Reverse-diffusion samplers driven by any log-score function (sedd-math section 5).

This module holds the exact tau-leaping steps and `sample`; samplers that spend fewer network evaluations
(reuse, confidence unmasking, block decoding) and the registry that selects any of them by name are in
`sedd_scale/diffusion/samplers/`.

The time grid, the noise levels and every weight are float64. A position is drawn by inverse CDF:
one float64 uniform u per position and step, a float64 cumulative sum of its weights and a binary
search, so a token of relative probability p is drawn with probability p down to float64 resolution
(~1e-16 of the running total). The reference's float32 race never draws a token weighing less than
~3e-9 of the largest (its exponentials lie in [6e-8, 23]), and a float32 cumulative sum drops any
weight below ~6e-8 of the running total (sedd-math 9.4). Weights that come out negative count as
zero; a position whose weights are all zero, or not finite, raises FloatingPointError.

Closed forms (sedd-math 5; s = exp(log-score) at the position, x its current token). Every token
y != x weighs a positive factor times (s_y - theta)^+; the current token x weighs the same factor
times w_x^+, with S = sum_{y != x} (s_y - theta)^+ (x's own entry excluded):

    graph    step             theta                        w_x                        factor  moving
    absorb   euler            0                            1/c - S                    c       x = MASK
    absorb   analytic         0                            s_x/E - S                  E       x = MASK
    absorb   denoise          0                            0 (MASK is never kept)     E       x = MASK
    uniform  euler            0                            N/c - S                    c/N     all
    uniform  analytic/denoise (1 - e^-ds) sum_y s_y / N    (1 + N/E) (s_x - theta)^+  E/N     all

with c = dt sigma(t), ds = sigma_bar(t) - sigma_bar(t - dt) (denoise: ds = sigma_bar(t), the jump to
noise 0) and E = e^ds - 1. They are exactly the definitions w = onehot(x) + dt sigma R(x, s) (euler)
and w_y = [exp(-ds Q) s]_y exp(ds Q)[x, y] (analytic), with the factor dropped. Under the absorbing
graph an unmasked token's only non-zero weight is its own (s_x for analytic/denoise, 1 for euler),
so it is kept and only masked positions are computed.

The uniform u maps to tokens in index order with x last: y = the first index whose cumulative
weight exceeds u * total, x when u * total >= S. Each step draws one (B, L) float64 uniform from the
generator, whatever the state, so runs with the same generator consume the same random numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from torch import Tensor

from .graph import Graph
from .noise import Noise
from .reference_loss import LogScoreFn

# float64 elements per chunk of positions: bounds the draw's extra memory to 32 MiB on CPU (larger chunks
# gain little there) and 512 MiB on CUDA (fewer kernel launches).
_CHUNK = {"cpu": 1 << 22, "cuda": 1 << 26}


def _chunk_rows(device: torch.device, vocab: int) -> int:
    return max(1, _CHUNK.get(device.type, _CHUNK["cpu"]) // vocab)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    """The float64 uniforms of one draw (53 random bits each); the only randomness the samplers use."""
    return torch.rand(shape, dtype=torch.float64, generator=generator, device=device)


def _check_totals(total: Tensor, where: str) -> None:
    """Raise unless every row's total weight is finite and positive (one host sync)."""
    bad = ~(torch.isfinite(total) & (total > 0))
    if bool(bad.any()):
        raise FloatingPointError(f"sampler weights are all zero or not finite at {int(bad.sum())} of "
                                 f"{total.numel()} {where}")


def sample_categorical(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Index drawn with probability proportional to max(w, 0) along the last dim (float64 inverse CDF)."""
    vocab = weights.shape[-1]
    flat = weights.reshape(-1, vocab)
    u = _uniform((flat.shape[0],), generator, weights.device)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=weights.device)
    total = torch.empty_like(u)
    rows = _chunk_rows(weights.device, vocab)
    for start in range(0, flat.shape[0], rows):
        part = slice(start, start + rows)
        cum = flat[part].to(torch.float64, copy=True).clamp_min_(0.0).cumsum_(-1)  # NaN stays NaN
        total[part] = cum[:, -1]
        out[part] = torch.searchsorted(cum, (u[part] * total[part]).unsqueeze(-1), right=True).squeeze(-1)
    _check_totals(total, "rows (weights that are -inf, NaN or overflowed)")
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


@dataclass(frozen=True)
class StepLaw:
    """One step's weights in the closed form of the module docstring; per-sequence float64 (B,) tensors.

    w_x = stay_score * (s_x - theta)^+ + stay_const - (S if minus_rest), theta = theta_coef * sum_y s_y;
    a None coefficient is absent (zero). `frozen_uses_score`: an unmasked absorbing position's one
    weight is s_x (analytic, denoise), which must be positive; otherwise it is 1 (euler).
    """

    theta_coef: Tensor | None = None
    stay_score: Tensor | None = None
    stay_const: Tensor | None = None
    minus_rest: bool = False
    frozen_uses_score: bool = False

    @classmethod
    def euler(cls, graph: Graph, rate_dt: Tensor) -> "StepLaw":
        """tau-leaping: c = dt sigma(t) per sequence."""
        return cls(stay_const=(1.0 if graph.absorb else float(graph.num_tokens)) / rate_dt, minus_rest=True)

    @classmethod
    def analytic(cls, graph: Graph, dsigma: Tensor, *, denoise: bool = False) -> "StepLaw":
        """Tweedie tau-leaping over a total-noise drop dsigma per sequence (denoise: to noise 0, MASK dropped)."""
        e = torch.expm1(dsigma)
        if graph.absorb:
            if denoise:
                return cls(frozen_uses_score=True)
            return cls(stay_score=1.0 / e, minus_rest=True, frozen_uses_score=True)
        n = graph.num_tokens
        return cls(theta_coef=-torch.expm1(-dsigma) / n, stay_score=1.0 + n / e)

    def per_sequence(self, batch: int, device) -> "StepLaw":
        """The coefficients as float64 tensors of shape (batch,) on `device` (a scalar applies to every sequence)."""
        coefs = {f.name: torch.as_tensor(getattr(self, f.name), dtype=torch.float64, device=device).reshape(-1)
                 .expand(batch) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **coefs)


@torch.no_grad()
def jump(log_score: Tensor, graph: Graph, x: Tensor, law: StepLaw, generator: torch.Generator | None = None) -> Tensor:
    """x (B, L) after one step with the weights of `law` from log-scores (B, L, >= graph.dim), drawn exactly."""
    if log_score.dim() != 3 or log_score.shape[:2] != x.shape or log_score.shape[-1] < graph.dim:
        raise ValueError(f"log-scores of shape {tuple(log_score.shape)} do not fit tokens {tuple(x.shape)} "
                         f"x at least {graph.dim} states")
    batch, length = x.shape
    law = law.per_sequence(batch, x.device)
    u = _uniform((batch * length,), generator, x.device)
    scores = log_score[..., : graph.dim].reshape(batch * length, graph.dim)
    tokens = x.reshape(-1)
    out = tokens.clone()
    total = torch.ones_like(u)  # per position, checked once at the end (one host sync per step)
    rows = None  # None: every position moves (chunks are slices, no gather)
    if graph.absorb:
        moving = tokens == graph.mask
        if law.frozen_uses_score:
            own = scores.gather(1, tokens.unsqueeze(1)).squeeze(1).to(torch.float64).exp()
            total = torch.where(moving, total, own)
        rows = moving.nonzero().squeeze(1)
        if rows.numel() == tokens.numel():
            rows = None
    count = batch * length if rows is None else rows.numel()
    chunk = _chunk_rows(x.device, graph.dim)
    buffer = torch.empty(min(chunk, max(count, 1)), graph.dim, dtype=torch.float64, device=x.device)
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        s = buffer[: stop - start]
        if rows is None:
            idx = torch.arange(start, stop, device=x.device)
            s.copy_(scores[start:stop])
        else:
            idx = rows[start:stop]
            s.copy_(scores[idx])
        out[idx], total[idx] = _draw(s.exp_(), tokens[idx], u[idx], law, idx // length)
    _check_totals(total, "positions: the model's log-scores underflowed to -inf, overflowed or are NaN there; "
                         "check the model's output and precision")
    return out.view(batch, length)


def _draw(s: Tensor, current: Tensor, u: Tensor, law: StepLaw, seq: Tensor) -> tuple[Tensor, Tensor]:
    """(drawn token, total weight) per row of scores s (rows, dim; float64, overwritten) at moving positions."""
    z = current.unsqueeze(1)
    own = None
    if law.theta_coef is not None:
        theta = law.theta_coef[seq] * s.sum(1)
        own = (s.gather(1, z).squeeze(1) - theta).clamp_min_(0.0)
        s.sub_(theta.unsqueeze(1)).clamp_min_(0.0)  # (s_y - theta)^+; NaN stays NaN
    elif law.stay_score is not None:
        own = s.gather(1, z).squeeze(1)
    cum = s.scatter_(1, z, 0.0).cumsum_(1)
    rest = cum[:, -1]
    stay = torch.zeros_like(rest)
    if law.stay_score is not None:
        stay += law.stay_score[seq] * own
    if law.stay_const is not None:
        stay += law.stay_const[seq]
    if law.minus_rest:
        stay -= rest
    total = rest + stay.clamp_min_(0.0)
    target = u * total
    inner = torch.searchsorted(cum, target.unsqueeze(1), right=True).squeeze(1)
    return torch.where(target >= rest, current, inner), total


def euler_step(log_score_fn: LogScoreFn, graph: Graph, noise: Noise, x: Tensor, t: Tensor, dt: float,
               generator: torch.Generator | None = None) -> Tensor:
    """tau-leaping with the reverse rates: w = onehot(x) + dt sigma(t) R(x, s)."""
    total, rate = noise(t)
    return jump(log_score_fn(x, total), graph, x, StepLaw.euler(graph, dt * rate.double()), generator)


def analytic_step(log_score_fn: LogScoreFn, graph: Graph, noise: Noise, x: Tensor, t: Tensor, dt: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """Tweedie tau-leaping: w_y = [exp(-dsigma Q) s]_y exp(dsigma Q)[x, y],
    dsigma = sigma_bar(t) - sigma_bar(t - dt)."""
    total = noise.total_noise(t)
    dsigma = (total - noise.total_noise(t - dt)).double()
    return jump(log_score_fn(x, total), graph, x, StepLaw.analytic(graph, dsigma), generator)


def denoise_step(log_score_fn: LogScoreFn, graph: Graph, noise: Noise, x: Tensor, t: Tensor,
                 generator: torch.Generator | None = None) -> Tensor:
    """The final jump from sigma_bar(t) to noise 0 (analytic rule); absorbing MASK is never kept."""
    total = noise.total_noise(t)
    law = StepLaw.analytic(graph, total.double(), denoise=True)
    return jump(log_score_fn(x, total), graph, x, law, generator)


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
    if not 0.0 < eps < 1.0:
        raise ValueError(f"the sampler's last time eps must be in (0, 1), got {eps}")
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


def unigram_entropy(ids: Tensor) -> Tensor:
    """Per-sample unigram entropy (nats, (N,) float64; SEDD/MDLM diversity): -sum_v p_v ln p_v, p_v = count(v) / L."""
    rows = []
    for row in ids.reshape(ids.shape[0], -1):
        counts = torch.unique(row, return_counts=True)[1].to(torch.float64)
        p = counts / counts.sum()
        rows.append(-(p * p.log()).sum())
    return torch.stack(rows) if rows else torch.zeros(0, dtype=torch.float64)
