"""An honest upper bound on -log p(x0) (sedd-math 2, Thm 3.6, and section 3).

bound(x0) = integral_0^1 sigma(t) sum_i E_{x_t ~ p_t|0}[score_entropy_i] dt + KL(p_1|0(.|x0) || p_base)

- The integral runs over all total noise from 0 to sigma_bar(1): t over (0, 1], not [eps, 1] (no
  (1 - eps) factor, no missing piece), plus [0, sigma_bar(0)] where a schedule starts above 0
  (geometric), i.e. the bound is for a reverse process that runs down to noise 0.
- The prior is explicit. Uniform graph: p_base is uniform. Absorbing graph: a pure-MASK base makes
  the KL infinite (a fraction e^-sigma_bar(1) of tokens is still clean at t = 1), so the base is
  "leaky": per token MASK with probability 1 - lam, else a uniform real token, lam = e^-sigma_bar(1).
  Then KL = lam log N per token (0.0108 nats for loglinear eps = 1e-3, N = 50257). The bound is
  exact for the generative model that starts from that base.
- Monte Carlo over t: the K draws per sequence form R independent replicates (`replicate_split`:
  the fewest equal ones, R >= 2), each a complete stratified design of K / R draws. The estimate is
  the replicates' mean; their spread gives an unbiased estimate of its Monte-Carlo variance. (Treating
  stratified draws as i.i.d. counts the integrand's variation over t as noise and overstates the error
  about 10x on trained models.)
- Conditional bound (`given`): the positions marked given hold their clean tokens throughout (never
  noised, never scored) and the model sees them at every noise level; only the other positions are
  noised and scored, and the prior covers them alone. This bounds -log p(x0[free] | x0[given]) for the
  reverse process that keeps the given tokens clamped (sedd-math 5, conditional sampling). Under the
  absorbing graph the unconditional ratios with clean given tokens are exactly the conditional ones,
  so with the exact score the bound is tight; under the uniform graph clamping is a heuristic and the
  bound, still valid, is looser.
- Two errors are reported (`ElboEstimate`): `stderr`, what another noise seed would change on these
  sequences, and `data_stderr`, what another set of as many sequences from the same source would change
  (their noise included), from the spread of independently drawn groups of sequences.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .graph import Graph
from .noise import Noise
from .reference_loss import LogScoreFn


def prior_kl(graph: Graph, noise: Noise, x0: Tensor, given: Tensor | None = None) -> Tensor:
    """KL(p_1|0(.|x0) || p_base) per sequence (nats, float64), with the bases described above, over the
    positions not `given` (bool, shaped like x0 or (L,); None: every position)."""
    sigma1 = noise.total_noise(torch.ones((), dtype=torch.float64))
    stay = torch.exp(-sigma1)
    n = graph.num_tokens
    if graph.absorb:
        per_token = stay * math.log(n)  # lam = stay: the MASK terms cancel exactly
    else:
        p_self = stay + (1 - stay) / n
        per_token = p_self * torch.log1p((n - 1) * stay) + (n - 1) * ((1 - stay) / n) * torch.log1p(-stay)
    if given is None:
        return torch.full((x0.shape[0],), float(per_token) * x0.shape[1], dtype=torch.float64, device=x0.device)
    free = (~given.to(x0.device).expand_as(x0)).sum(-1).to(torch.float64)
    return float(per_token) * free


@dataclass(frozen=True)
class ElboEstimate:
    """The bound summed over a set of sequences with its errors; estimates of disjoint sets merge by adding.

    `mc_variance`: Monte-Carlo variance of `total_nats` (from the replicates). `groups`: (nats, tokens) of each
    independently drawn group of sequences (a sequence, or an evaluation batch), for the data-sampling error.
    """

    total_nats: float
    mc_variance: float
    num_tokens: int
    num_sequences: int
    groups: tuple[tuple[float, int], ...] = ()

    def merge(self, other: "ElboEstimate") -> "ElboEstimate":
        """The estimate over both sets of sequences."""
        return ElboEstimate(self.total_nats + other.total_nats, self.mc_variance + other.mc_variance,
                            self.num_tokens + other.num_tokens, self.num_sequences + other.num_sequences,
                            self.groups + other.groups)

    def _tokens(self) -> int:
        if self.num_tokens == 0:
            raise ValueError("the ELBO of no tokens is undefined: nothing was evaluated (an empty split?)")
        return self.num_tokens

    @property
    def nats_per_token(self) -> float:
        """Bound on the negative log-likelihood per token."""
        return self.total_nats / self._tokens()

    @property
    def stderr(self) -> float:
        """Monte-Carlo standard error of nats_per_token: what another noise seed would change on these sequences."""
        return math.sqrt(self.mc_variance) / self._tokens()

    @property
    def data_stderr(self) -> float:
        """Standard error of nats_per_token over the draw of the sequences (as many again, from the same source,
        with their noise), from the spread of the groups' nats per token; NaN with fewer than two groups."""
        count = len(self.groups)
        if count < 2:
            return math.nan
        tokens = sum(t for _, t in self.groups)
        mean = sum(n for n, _ in self.groups) / tokens
        spread = sum((n - mean * t) ** 2 for n, t in self.groups)  # ratio estimator: groups may differ in size
        return math.sqrt(spread * count / (count - 1)) / tokens

    @property
    def perplexity_bound(self) -> float:
        """exp(nats per token): an upper bound on the perplexity."""
        return math.exp(self.nats_per_token)


def replicate_split(draws: int, replicates: int | None = None) -> tuple[int, int]:
    """(replicates R, draws per replicate): the fewest equal replicates, at least 2, unless R is given.

    R is the smallest factor >= 2 of `draws` (2 for an even count, e.g. 8 draws = 2 x 4 stratified t).
    """
    if draws < 2:
        raise ValueError(f"draws must be >= 2 (two independent replicates give a standard error), got {draws}")
    if replicates is None:
        replicates = next(r for r in range(2, draws + 1) if draws % r == 0)
    if replicates < 2 or draws % replicates:
        raise ValueError(f"{draws} draws cannot form {replicates} equal replicates (at least 2): pick a multiple")
    return replicates, draws // replicates


Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the batch, or one per row (each row's draws then depend on its own generator only, so a row
gets the same number in any batch)."""


def _per_row(generator: Generators) -> bool:
    return isinstance(generator, Sequence)


def _uniform(rows: int, device, generator: Generators) -> Tensor:
    """(rows,) float64 uniforms from the batch's generator or each row's own."""
    if _per_row(generator):
        if len(generator) != rows:
            raise ValueError(f"{len(generator)} generators for {rows} rows: pass one per row, or one for the batch")
        return torch.cat([torch.rand(1, dtype=torch.float64, device=device, generator=g) for g in generator])
    return torch.rand(rows, dtype=torch.float64, device=device, generator=generator)


def _transition(graph: Graph, x0: Tensor, total: Tensor, generator: Generators) -> Tensor:
    """x_t ~ p_t|0(. | x0) from the batch's generator or each row's own."""
    if _per_row(generator):
        return torch.cat([graph.sample_transition(x0[r:r + 1], total[r:r + 1], generator=g)
                          for r, g in enumerate(generator)])
    return graph.sample_transition(x0, total, generator=generator)


ScoreEntropyFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(x_t (B, L), total_noise (B,), x0 (B, L)) -> per-token score entropy (B, L), no rate weight."""


def score_entropy_fn(log_score_fn: LogScoreFn, graph: Graph) -> ScoreEntropyFn:
    """The per-token score entropy of a model given by its (full-vocabulary) log-scores."""
    def fn(x_t: Tensor, total: Tensor, x0: Tensor) -> Tensor:
        return graph.score_entropy(log_score_fn(x_t, total)[..., : graph.dim], total, x_t, x0)
    return fn


def _dwdse(se_fn: ScoreEntropyFn, graph: Graph, x0: Tensor, total: Tensor, generator: Generators,
           given: Tensor | None = None) -> Tensor:
    """sum_i score_entropy_i at total noise `total` (B,), one x_t draw per sequence, float64; `given` positions
    (bool, broadcast to x0) keep their clean token and are not summed."""
    x_t = _transition(graph, x0, total, generator)
    if given is None:
        return se_fn(x_t, total, x0).to(torch.float64).sum(-1)
    x_t = torch.where(given, x0, x_t)  # every position is drawn, so the generator moves on as without `given`
    return se_fn(x_t, total, x0).to(torch.float64).masked_fill(given, 0.0).sum(-1)


def noise_draws(noise: Noise, rows: int, num_samples: int, *, device=None, generator: Generators = None,
                antithetic: bool = False) -> list[list[tuple[Tensor, Tensor]]]:
    """The ELBO's quadrature over total noise from 0, as pieces of (total_noise, weight) draws per row.

    Piece 1: num_samples stratified t in (0, 1] (never exactly 0), weight sigma(t): covers
    [sigma_bar(0), sigma_bar(1)]. Piece 2, where sigma_bar(0) > 0 (geometric): max(2, K // 4)
    stratified total noise in (0, sigma_bar(0)], weight sigma_bar(0). Each piece's mean of
    weight * sum_i score_entropy estimates its part of the integral. `antithetic`: strata 2j and
    2j+1 share one uniform u, placed at u and 1 - u within them (each draw stays uniform in its stratum).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")

    def strata(count: int) -> list[Tensor]:
        u = [_uniform(rows, device, generator) for _ in range((count + 1) // 2 if antithetic else count)]
        offsets = [u[k // 2] if k % 2 == 0 else 1.0 - u[k // 2] for k in range(count)] if antithetic else u
        return [1.0 - (k + offsets[k]) / count for k in range(count)]

    pieces = [[(noise.total_noise(t), noise.rate_noise(t)) for t in strata(num_samples)]]
    sigma0 = float(noise.total_noise(torch.zeros((), dtype=torch.float64)))
    if sigma0 > 0:
        pieces.append([(sigma0 * u, torch.full_like(u, sigma0)) for u in strata(max(2, num_samples // 4))])
    return pieces


@torch.no_grad()
def elbo_per_sequence(model: LogScoreFn | ScoreEntropyFn, graph: Graph, noise: Noise, x0: Tensor, *,
                      num_samples: int = 8, replicates: int | None = None, generator: Generators = None,
                      fused: bool = False, given: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(bound, Monte-Carlo variance of it) per sequence, float64: `num_samples` draws as replicates (`replicate_split`).

    `model` is a log-score function, or with `fused=True` a ScoreEntropyFn (e.g. the vocab-parallel
    head loss, which never materialises full-vocabulary log-scores). `given` (bool, (B, L) or (L,)):
    the conditional bound on the other positions given these (module docstring); None: unconditional.
    `generator`: one for the batch, or one per row (`Generators`).
    """
    se_fn = model if fused else score_entropy_fn(model, graph)
    if given is not None:
        given = given.to(device=x0.device, dtype=torch.bool).expand_as(x0)
    count, per_replicate = replicate_split(num_samples, replicates)
    estimates = torch.zeros(count, x0.shape[0], dtype=torch.float64, device=x0.device)
    for r in range(count):
        for piece in noise_draws(noise, x0.shape[0], per_replicate, device=x0.device, generator=generator):
            values = torch.stack([weight * _dwdse(se_fn, graph, x0, total, generator, given)
                                  for total, weight in piece])
            estimates[r] += values.mean(0)
    return prior_kl(graph, noise, x0, given) + estimates.mean(0), estimates.var(0) / count


def elbo(model: LogScoreFn | ScoreEntropyFn, graph: Graph, noise: Noise, x0: Tensor, *, num_samples: int = 8,
         replicates: int | None = None, generator: Generators = None, fused: bool = False,
         given: Tensor | None = None) -> ElboEstimate:
    """The bound summed over the batch (each sequence a group), ready to merge with other batches and ranks; with
    `given`, the conditional bound, counting only the positions not given as tokens."""
    bound, var = elbo_per_sequence(model, graph, noise, x0, num_samples=num_samples, replicates=replicates,
                                   generator=generator, fused=fused, given=given)
    free = (torch.full((x0.shape[0],), x0.shape[1], dtype=torch.long) if given is None else
            (~given.to(torch.bool).cpu().expand(x0.shape)).sum(-1))
    return ElboEstimate(float(bound.sum()), float(var.sum()), int(free.sum()), x0.shape[0],
                        tuple((float(b), int(n)) for b, n in zip(bound, free)))
