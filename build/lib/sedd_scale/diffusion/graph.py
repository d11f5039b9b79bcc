"""Per-token forward processes ("graphs"): absorbing (MASK) and uniform (sedd-math sections 1-2, 5).

Q is in column convention: Q[y, x] is the rate of x -> y. Both graphs satisfy Q^2 = -Q, so
exp(aQ) = I + (1 - e^-a) Q gives every closed form below. All methods are vectorised over
index tensors of any shape S and return (*S, dim) where a vector over states is returned.
`sigma` arguments (total noise) may be a scalar, shape (B,) for x of shape (B, ...), or any
shape that broadcasts to x.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .parametrization import log_expm1


def _expand(sigma: Tensor | float, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """sigma as a tensor broadcastable to `like` (a per-sequence (B,) sigma gets trailing dims)."""
    sigma = torch.as_tensor(sigma, device=like.device)
    if dtype is not None or not sigma.is_floating_point():
        sigma = sigma.to(dtype or torch.get_default_dtype())
    if sigma.dim() == 1 and like.dim() > 1 and sigma.shape[0] == like.shape[0]:
        sigma = sigma.reshape(-1, *([1] * (like.dim() - 1)))
    try:
        torch.broadcast_shapes(sigma.shape, like.shape)
    except RuntimeError:
        raise ValueError(f"sigma of shape {tuple(sigma.shape)} does not broadcast to tokens {tuple(like.shape)}"
                         ) from None
    return sigma


def _bregman(log_s: Tensor, log_r: Tensor) -> Tensor:
    """r * phi(log s - log r), phi(u) = e^u - 1 - u >= 0: one score-entropy term s - r log s + K(r).

    Each term is non-negative and computed without cancellation (expm1 for u < 1), so sums of
    terms keep full relative precision even at the optimum, and nothing overflows below log s ~ 88.
    """
    u = log_s - log_r
    small = u < 1.0
    u_small = torch.where(small, u, torch.zeros_like(u))
    r = torch.exp(log_r)
    near = r * (torch.expm1(u_small) - u_small)
    far = torch.exp(torch.where(small, torch.zeros_like(log_s), log_s)) - r * (1.0 + u)
    return torch.where(small, near, far)


class Graph:
    """Shared checks and the graph-independent reverse rate.

    Forward draws use float64 uniforms whatever the precision of sigma, so a float32 and a float64
    run with the same generator see the same noised tokens.
    """

    dim: int
    num_tokens: int
    absorb: bool

    def _check_tokens(self, x: Tensor, name: str, high: int) -> None:
        if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"{name} must be an integer token tensor, got {x.dtype}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= high):
            raise ValueError(
                f"{name} holds token ids in [{int(x.min())}, {int(x.max())}] but this {type(self).__name__} "
                f"graph allows [0, {high}) (num_tokens={self.num_tokens}): check the tokenizer/vocab settings"
            )

    def _check_scores(self, score: Tensor, x: Tensor) -> None:
        if score.shape != (*x.shape, self.dim):
            raise ValueError(
                f"scores of shape {tuple(score.shape)} do not match tokens {tuple(x.shape)} x dim {self.dim}; "
                f"a vocab-padded model output must be sliced to [..., :{self.dim}]"
            )

    def reverse_rate(self, x: Tensor, score: Tensor) -> Tensor:
        """Reverse rates R_y = s_y Q[x, y] (y != x), R_x = -sum_{y != x} R_y."""
        self._check_scores(score, x)
        rate = score * self.transp_rate(x).to(score.dtype)
        idx = x.unsqueeze(-1)
        rate.scatter_(-1, idx, 0.0)
        return rate.scatter_(-1, idx, -rate.sum(-1, keepdim=True))

    def _onehot_fill(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        return torch.zeros(*x.shape, self.dim, dtype=dtype, device=x.device)


class Absorbing(Graph):
    """Every token jumps to MASK (index N) at rate 1; MASK never leaves."""

    absorb = True

    def __init__(self, num_tokens: int):
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        self.num_tokens = num_tokens
        self.dim = num_tokens + 1
        self.mask = num_tokens

    def rate(self, x: Tensor) -> Tensor:
        """Column x of Q: rates out of x (-1 at x, +1 at MASK; zero for x = MASK)."""
        dtype = torch.get_default_dtype()
        live = (x != self.mask).to(dtype).unsqueeze(-1)
        out = self._onehot_fill(x, dtype).scatter_(-1, x.unsqueeze(-1), -live)
        out[..., self.mask] += live.squeeze(-1)
        return out

    def transp_rate(self, x: Tensor) -> Tensor:
        """Row x of Q: rates into x (-e_x for a real token; 1 from every real token into MASK)."""
        dtype = torch.get_default_dtype()
        is_mask = (x == self.mask).unsqueeze(-1)
        out = is_mask.to(dtype).expand(*x.shape, self.dim).clone()
        out[..., self.mask] = 0.0
        return out.scatter_(-1, x.unsqueeze(-1), torch.where(is_mask, 0.0, -1.0).to(dtype))

    def transition(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Column x of exp(sigma Q): P(x_t = . | x_0 = x)."""
        sigma = _expand(sigma, x)
        stay = torch.exp(-sigma).expand(x.shape)
        is_mask = x == self.mask
        out = self._onehot_fill(x, stay.dtype)
        out[..., self.mask] = torch.where(is_mask, 1.0, -torch.expm1(-sigma)).expand(x.shape)
        return out.scatter_(-1, x.unsqueeze(-1), torch.where(is_mask, 1.0, stay).unsqueeze(-1))

    def transp_transition(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Row x of exp(sigma Q): P(x_t = x | x_0 = .)."""
        sigma = _expand(sigma, x)
        stay = torch.exp(-sigma).expand(x.shape)
        is_mask = x == self.mask
        move = torch.where(is_mask, -torch.expm1(-sigma), 0.0).expand(x.shape)
        out = move.unsqueeze(-1).expand(*x.shape, self.dim).clone()
        out[..., self.mask] = is_mask.to(out.dtype)
        return out.scatter_(-1, x.unsqueeze(-1), torch.where(is_mask, 1.0, stay).unsqueeze(-1))

    def sample_transition(self, x0: Tensor, sigma: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        """x_t ~ p_t|0(. | x0): each token independently becomes MASK with probability 1 - e^-sigma."""
        sigma = _expand(sigma, x0)
        u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
        return torch.where(u < -torch.expm1(-sigma.double()), self.mask, x0)

    def sample_limit(self, *shape: int, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        """A draw from the t -> infinity limit: all MASK."""
        return torch.full(shape, self.mask, dtype=torch.long, device=device)

    def staggered_score(self, score: Tensor, dsigma: Tensor | float) -> Tensor:
        """exp(-dsigma Q) s: e^dsigma s_y for real tokens, s_m - (e^dsigma - 1) sum_{y != m} s_y at MASK."""
        dsigma = _expand(dsigma, score[..., 0], score.dtype).unsqueeze(-1)
        out = score * torch.exp(dsigma)
        real_mass = score[..., : self.mask].sum(-1, keepdim=True)
        out[..., self.mask : self.mask + 1] = score[..., self.mask :] - torch.expm1(dsigma) * real_mass
        return out

    def score_entropy(self, log_score: Tensor, sigma: Tensor | float, x_t: Tensor, x_0: Tensor) -> Tensor:
        """Per-token score entropy (no rate weight), (B, L): zero unless x_t is MASK; then
        sum_{y != m, x0} s_y + (1/E) phi(log s_x0 + log E), E = e^sigma - 1 (sedd-math 2.1)."""
        self._check_scores(log_score, x_t)
        self._check_tokens(x_t, "x_t", self.dim)
        self._check_tokens(x_0, "x_0", self.num_tokens)
        if x_0.shape != x_t.shape:
            raise ValueError(f"x_0 {tuple(x_0.shape)} and x_t {tuple(x_t.shape)} must have the same shape")
        ls = log_score.float() if log_score.dtype in (torch.float16, torch.bfloat16) else log_score
        log_e = log_expm1(_expand(sigma, x_t, ls.dtype)).expand(x_t.shape)
        masked = x_t == self.mask
        idx0 = x_0.unsqueeze(-1)
        l0 = ls.gather(-1, idx0).squeeze(-1)
        # Unmasked rows and the x0 column are removed before exp, so no inf * 0 can reach a gradient.
        rest = ls[..., : self.mask].masked_fill(~masked.unsqueeze(-1), float("-inf"))
        rest.scatter_(-1, idx0, float("-inf"))
        rest = rest.exp().sum(-1)
        x0_term = _bregman(torch.where(masked, l0, -log_e), -log_e)
        return torch.where(masked, rest + x0_term, torch.zeros_like(rest))


class Uniform(Graph):
    """Every token jumps to a uniformly drawn token at rate 1: Q = (1/N) 11^T - I."""

    absorb = False

    def __init__(self, num_tokens: int):
        if num_tokens < 2:
            raise ValueError(f"the uniform graph needs num_tokens >= 2, got {num_tokens}")
        self.num_tokens = num_tokens
        self.dim = num_tokens

    def rate(self, x: Tensor) -> Tensor:
        """Column x of Q: 1/N to every token, -(N-1)/N at x."""
        dtype = torch.get_default_dtype()
        out = torch.full((*x.shape, self.dim), 1.0 / self.dim, dtype=dtype, device=x.device)
        return out.scatter_(-1, x.unsqueeze(-1), -(self.dim - 1) / self.dim)

    def transp_rate(self, x: Tensor) -> Tensor:
        """Row x of Q (Q is symmetric)."""
        return self.rate(x)

    def transition(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Column x of exp(sigma Q): e^-sigma [y = x] + (1 - e^-sigma)/N."""
        sigma = _expand(sigma, x).expand(x.shape)
        move = (-torch.expm1(-sigma) / self.dim).unsqueeze(-1)
        out = move.expand(*x.shape, self.dim).clone()
        return out.scatter_add_(-1, x.unsqueeze(-1), torch.exp(-sigma).unsqueeze(-1))

    def transp_transition(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Row x of exp(sigma Q) (symmetric)."""
        return self.transition(x, sigma)

    def sample_transition(self, x0: Tensor, sigma: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        """x_t ~ p_t|0(. | x0): with probability 1 - e^-sigma a token is redrawn uniformly (maybe itself)."""
        sigma = _expand(sigma, x0)
        u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
        fresh = torch.randint(0, self.dim, x0.shape, generator=generator, device=x0.device)
        return torch.where(u < -torch.expm1(-sigma.double()), fresh, x0)

    def sample_limit(self, *shape: int, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        """A draw from the limit: i.i.d. uniform tokens."""
        return torch.randint(0, self.dim, shape, generator=generator, device=device)

    def staggered_score(self, score: Tensor, dsigma: Tensor | float) -> Tensor:
        """exp(-dsigma Q) s = e^dsigma s - ((e^dsigma - 1)/N) sum(s)."""
        dsigma = _expand(dsigma, score[..., 0], score.dtype).unsqueeze(-1)
        return score * torch.exp(dsigma) - torch.expm1(dsigma) / self.dim * score.sum(-1, keepdim=True)

    def score_entropy(self, log_score: Tensor, sigma: Tensor | float, x_t: Tensor, x_0: Tensor) -> Tensor:
        """Per-token score entropy (no rate weight), (B, L): (1/N) sum_{y != x_t} r_y phi(log s_y - log r_y)
        with r = a = E/(E+N) everywhere if x_t = x_0, else r = 1 except r_x0 = 1/a (sedd-math 2.1)."""
        self._check_scores(log_score, x_t)
        self._check_tokens(x_t, "x_t", self.dim)
        self._check_tokens(x_0, "x_0", self.dim)
        if x_0.shape != x_t.shape:
            raise ValueError(f"x_0 {tuple(x_0.shape)} and x_t {tuple(x_t.shape)} must have the same shape")
        ls = log_score.float() if log_score.dtype in (torch.float16, torch.bfloat16) else log_score
        log_e = log_expm1(_expand(sigma, x_t, ls.dtype)).expand(x_t.shape)
        # log a = log E - log(E + N), formed without the 1 - N/(E+N) cancellation (sedd-math 9.1).
        log_a = log_e - torch.logaddexp(log_e, torch.full_like(log_e, float(self.dim)).log())
        same = x_t == x_0
        terms = _bregman(ls, torch.where(same, log_a, 0.0).unsqueeze(-1))
        idx0, idx = x_0.unsqueeze(-1), x_t.unsqueeze(-1)
        at_x0 = _bregman(ls.gather(-1, idx0).squeeze(-1), -log_a)
        terms.scatter_(-1, idx0, torch.where(same, 0.0, at_x0).unsqueeze(-1))
        terms.scatter_(-1, idx, 0.0)
        return terms.sum(-1) / self.dim


def check_token_ids(x: Tensor, name: str, high: int, graph: str, num_tokens: int) -> None:
    """Raise a ValueError naming the range unless every id of `x` is in [0, high) (a host sync on a device)."""
    if not x.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(x))  # one pass over the ids (min and max were two)
    if lo < 0 or hi >= high:
        raise ValueError(f"{name} holds ids in [{lo}, {hi}] outside [0, {high}) for the "
                         f"{graph} graph with num_tokens={num_tokens}: check the tokenizer/vocab settings")


def get_graph(kind: str, num_tokens: int) -> Graph:
    """Build a graph by the reference's name: "absorb" (MASK at index num_tokens) or "uniform"."""
    kinds = {"absorb": Absorbing, "uniform": Uniform}
    if kind not in kinds:
        raise ValueError(f"unknown graph type {kind!r}; choose one of {sorted(kinds)}")
    return kinds[kind](num_tokens)
