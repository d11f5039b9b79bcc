"""The score-entropy objective of the fused head (sedd-math 2.1): per graph, which tokens are projected, their
ratios r, and each chunk's per-token loss and logit gradient, eager or as one compiled expression per output.

Every score-entropy term is per vocabulary entry, r_y * phi(l_y - log r_y) with phi(u) = expm1(u) - u >= 0
(the Bregman form; r_y = 0 gives e^l_y), so a TP rank sums the terms of its own entries. The sum of
non-negative terms keeps full relative precision, unlike the equivalent exp-sum / log-sum split, which
cancels near the optimum. The gradient d/dl_y = r_y * expm1(l_y - log r_y) = e^l_y - r_y is purely local.
Only real tokens y < N enter: the MASK column (absorb) and vocabulary padding are never projected; for the
absorbing graph only masked positions have a nonzero loss, so only they are projected at all.

Registered as the objective "score_entropy" for both graphs (`objectives.py`: the protocol and the registry).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sedd_scale.compiled import Region
from sedd_scale.diffusion.parametrization import log_expm1
from sedd_scale.loss.objectives import objective

# Above this u = l - log r, the vector terms r * phi(u) are formed as e^l - r (1 + u): r * e^u alone
# could overflow while e^l does not, and e^u >> 1 + u leaves nothing to cancel.
_FAR = 40.0


def _bregman(l: Tensor, log_r: Tensor, r: Tensor) -> Tensor:
    """r * phi(l - log r), phi(u) = expm1(u) - u, for vectors; finite while e^l is."""
    u = l - log_r
    near = r * (torch.expm1(u.clamp(max=_FAR)) - u)
    return torch.where(u > _FAR, torch.exp(l) - r * (1.0 + u), near)


def _bregman_grad(l: Tensor, log_r: Tensor, r: Tensor) -> Tensor:
    """d/dl of r * phi(l - log r) = r * expm1(l - log r), for vectors; finite while e^l is."""
    u = l - log_r
    return torch.where(u > _FAR, torch.exp(l) - r, r * torch.expm1(u.clamp(max=_FAR)))


def _put(t: Tensor, col: Tensor, inside: Tensor, value: Tensor) -> None:
    """t[i, col[i]] = value[i] for rows where `inside`; other rows keep their values (no host sync)."""
    idx = torch.where(inside, col, torch.zeros_like(col)).unsqueeze(1)
    t.scatter_(1, idx, torch.where(inside, value, t.gather(1, idx).squeeze(1)).unsqueeze(1))


@dataclass
class _Tokens:
    """Per active token: local columns of x_0 / x_t and the ratios r of sedd-math 2.1 (accumulation dtype)."""

    rows: Tensor | None  # indices into the flattened tokens, None = all tokens
    col0: Tensor
    in0: Tensor  # x_0's entry is in this shard and carries the special ratio r0
    colx: Tensor | None  # x_t's (self, excluded) entry (uniform only)
    inx: Tensor | None
    shift: Tensor | None  # absorb scale_by_sigma offset
    log_r: Tensor | None  # default ratio of every other entry (uniform; absorb's is 0)
    r: Tensor | None
    log_r0: Tensor
    r0: Tensor
    weight: float  # the rate weight Q[x_t, y] of every entry: 1 (absorb, masked) or 1/N (uniform)

    def chunk(self, s: int, e: int) -> "_Tokens":
        """The same fields for active tokens s:e."""
        cut = lambda t: t if t is None else t[s:e]  # noqa: E731
        return _Tokens(None, *(cut(getattr(self, f)) for f in
                               ("col0", "in0", "colx", "inx", "shift", "log_r", "r", "log_r0", "r0")), self.weight)


def _absorb_terms(z: Tensor, tok: _Tokens, scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(per-token loss, logit gradient or None) of a masked chunk of raw logits; consumes z (in place). Terms are
    e^l_y, except r0 phi(l_x0 - log r0) at x_0; gradients e^l_y, except r0 expm1(l_x0 - log r0) at x_0."""
    if tok.shift is not None:
        z.sub_(tok.shift.unsqueeze(1))
    col0 = torch.where(tok.in0, tok.col0, 0)
    l0 = z.gather(1, col0.unsqueeze(1)).squeeze(1)
    e = z.exp_()
    _put(e, tok.col0, tok.in0, _bregman(l0, tok.log_r0, tok.r0))
    loss = e.sum(1)
    if scale is None:
        return loss, None
    _put(e, tok.col0, tok.in0, _bregman_grad(l0, tok.log_r0, tok.r0))
    return loss, e.mul_(scale.to(e.dtype).unsqueeze(1))


# A uniform chunk's elementwise work runs over blocks of rows of about this size on a CPU, with two block-sized
# temporaries reused by every block: small beside the chunk's logits and warm in the cache, where chunk-sized
# temporaries would be fresh pages (faults) every chunk, which cost more than the arithmetic. On an accelerator
# the chunk is one block (fewer kernel launches; the caching allocator reuses the temporaries).
_BLOCK_BYTES = 8 * 2**20


def _uniform_terms(z: Tensor, tok: _Tokens, scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(per-token loss, logit gradient or None) of a chunk of the uniform graph; consumes z (the gradient is returned
    in z's storage).

    Every entry holds r phi(u) and its gradient r expm1(u), u = l - log r, as r (t - u) + d and r t + d with
    t = expm1(min(u, FAR)) and d = e^max(l, FAR + log r) - e^(FAR + log r): for u <= FAR (every sane entry)
    d is exactly 0, and beyond it the sums are e^l - r (1 + u) and e^l - r, finite while e^l is. No branch.
    x_0's and x_t's own entries are first set to l = log r (u = 0: term and gradient exactly 0); x_0's own term
    r0 phi(l_x0 - log r0) and gradient are added afterwards. Eleven passes over the logits, in blocks of rows.
    """
    n = z.shape[0]
    col0 = torch.where(tok.in0, tok.col0, 0)
    l0 = z.gather(1, col0.unsqueeze(1)).squeeze(1)
    _put(z, tok.col0, tok.in0, tok.log_r)
    _put(z, tok.colx, tok.inx, tok.log_r)
    log_r, r = tok.log_r.unsqueeze(1), tok.r.unsqueeze(1)
    edge = _FAR + log_r
    e_edge = edge.exp()
    sw = None if scale is None else (scale * tok.weight).to(z.dtype).unsqueeze(1)
    loss = torch.empty(n, dtype=z.dtype, device=z.device)
    rows = n if z.device.type != "cpu" else max(1, _BLOCK_BYTES // max(1, z.shape[1] * z.element_size()))
    d_buf, t_buf = torch.empty(2, min(rows, n), z.shape[1], dtype=z.dtype, device=z.device)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        zb, d, t = z[s:e], d_buf[: e - s], t_buf[: e - s]
        torch.maximum(zb, edge[s:e], out=d).exp_().sub_(e_edge[s:e])
        u = zb.sub_(log_r[s:e])
        torch.clamp(u, max=_FAR, out=t).expm1_()
        terms = torch.addcmul(d, torch.sub(t, u, out=u), r[s:e], out=u)  # d + (t - u) r, in u's storage
        torch.sum(terms, 1, out=loss[s:e])
        if sw is not None:
            torch.addcmul(d, t, r[s:e], out=zb).mul_(sw[s:e])  # the gradient, in z's storage
    loss = loss.add_(torch.where(tok.in0, _bregman(l0, tok.log_r0, tok.r0), 0.0)).mul_(tok.weight)
    if sw is None:
        return loss, None
    _put(z, tok.col0, tok.in0, _bregman_grad(l0, tok.log_r0, tok.r0) * sw.squeeze(1))
    return loss, z


def _at(z: Tensor, col: Tensor, inside: Tensor) -> Tensor:
    """(chunk, V_local) mask of the entries [i, col[i]] for rows where `inside`."""
    return (torch.arange(z.shape[1], device=z.device) == col.unsqueeze(1)) & inside.unsqueeze(1)


def _absorb_fused(z, col0, in0, shift, log_r0, r0, scale):
    """`_absorb_terms` as one expression per output (its puts as masks, nothing in place): what torch.compile fuses
    into a pass for the loss and a pass for the gradient."""
    l = z if shift is None else z - shift.unsqueeze(1)
    l0 = l.gather(1, torch.where(in0, col0, 0).unsqueeze(1)).squeeze(1)
    at0, e = _at(l, col0, in0), l.exp()
    loss = torch.where(at0, _bregman(l0, log_r0, r0).unsqueeze(1), e).sum(1)
    if scale is None:
        return loss, None
    return loss, torch.where(at0, _bregman_grad(l0, log_r0, r0).unsqueeze(1), e) * scale.to(e.dtype).unsqueeze(1)


def _uniform_fused(z, col0, in0, colx, inx, log_r, r, log_r0, r0, scale, weight: float):
    """`_uniform_terms` as one expression per output, for torch.compile (the same formulas)."""
    l0 = z.gather(1, torch.where(in0, col0, 0).unsqueeze(1)).squeeze(1)
    at0, atx = _at(z, col0, in0), _at(z, colx, inx)
    edge = (_FAR + log_r).unsqueeze(1)
    d = torch.maximum(z, edge).exp() - edge.exp()
    u = z - log_r.unsqueeze(1)
    t = u.clamp(max=_FAR).expm1()
    terms = torch.where(atx, 0.0, (t - u) * r.unsqueeze(1) + d)
    loss = torch.where(at0, _bregman(l0, log_r0, r0).unsqueeze(1), terms).sum(1) * weight
    if scale is None:
        return loss, None
    g = torch.where(at0, _bregman_grad(l0, log_r0, r0).unsqueeze(1), torch.where(atx, 0.0, t * r.unsqueeze(1) + d))
    return loss, g * (scale * weight).to(g.dtype).unsqueeze(1)


ABSORB_FUSED, UNIFORM_FUSED = Region(_absorb_fused), Region(_uniform_fused)


@objective("score_entropy", "absorb")
@dataclass(frozen=True)
class AbsorbScoreEntropy:
    """Score entropy on the absorbing graph: only masked positions are projected; terms e^l_y, except
    r0 phi(l_x0 - log r0) at x_0, r0 = 1 / (e^sigma - 1); scale_by_sigma shifts the logits by log((e^sigma - 1) N)."""

    graph: ClassVar[str] = "absorb"
    num_tokens: int
    scale_by_sigma: bool = False

    def __post_init__(self):
        if self.num_tokens < 2:
            raise ValueError(f"num_tokens must be >= 2, got {self.num_tokens}")

    @property
    def graph_dim(self) -> int:
        """States per position: N real tokens and MASK."""
        return self.num_tokens + 1

    def select(self, x_t: Tensor, x_0: Tensor, sigma: Tensor, vocab_start: int, n_local: int,
               dtype: torch.dtype) -> _Tokens:
        """The masked tokens (one host sync: their count sizes what follows) and their ratios, formed in float64."""
        rows = torch.nonzero(x_t == self.num_tokens).squeeze(1)
        x_0, sigma = x_0[rows], sigma[rows]
        log_e = log_expm1(sigma.double())  # log(e^sigma - 1)
        col0 = x_0 - vocab_start
        in0 = (col0 >= 0) & (col0 < n_local)
        shift = (log_e + math.log(self.num_tokens)).to(dtype) if self.scale_by_sigma else None
        return _Tokens(rows, col0, in0, None, None, shift, None, None, (-log_e).to(dtype),
                       torch.exp(-log_e).to(dtype), 1.0)

    def terms(self, z: Tensor, tok: _Tokens, scale: Tensor | None, compiled: bool):
        """(per-token loss, logit gradient or None) of a chunk of raw logits. The fused form computes e^l once per
        output, which costs nothing on a GPU (memory-bound) but more than eager's single in-place pass on a CPU,
        where it stays eager."""
        if not compiled or z.device.type == "cpu":
            return _absorb_terms(z, tok, scale)
        return ABSORB_FUSED(True, z, tok.col0, tok.in0, tok.shift, tok.log_r0, tok.r0, scale)


@objective("score_entropy", "uniform")
@dataclass(frozen=True)
class UniformScoreEntropy:
    """Score entropy on the uniform graph: every position is projected, every entry carries a term."""

    graph: ClassVar[str] = "uniform"
    num_tokens: int
    scale_by_sigma: bool = False

    def __post_init__(self):
        if self.num_tokens < 2:
            raise ValueError(f"num_tokens must be >= 2, got {self.num_tokens}")
        if self.scale_by_sigma:
            raise ValueError("scale_by_sigma is only defined for the absorb graph (the reference asserts it)")

    @property
    def graph_dim(self) -> int:
        """States per position: the N real tokens."""
        return self.num_tokens

    def select(self, x_t: Tensor, x_0: Tensor, sigma: Tensor, vocab_start: int, n_local: int,
               dtype: torch.dtype) -> _Tokens:
        """Every token, with the ratios of x_0's and x_t's entries formed in float64."""
        log_e = log_expm1(sigma.double())  # log(e^sigma - 1)
        col0 = x_0 - vocab_start
        in0 = (col0 >= 0) & (col0 < n_local)
        colx = x_t - vocab_start
        inx = (colx >= 0) & (colx < n_local)
        # log a = log E - log(E + N), without the 1 - N/(E + N) cancellation (sedd-math 9.1).
        log_a = log_e - torch.logaddexp(log_e, torch.full_like(log_e, math.log(self.num_tokens)))
        same = x_t == x_0
        log_r = torch.where(same, log_a, torch.zeros_like(log_a))
        return _Tokens(None, col0, in0 & ~same, colx, inx, None, log_r.to(dtype), log_r.exp().to(dtype),
                       (-log_a).to(dtype), torch.exp(-log_a).to(dtype), 1.0 / self.num_tokens)

    def terms(self, z: Tensor, tok: _Tokens, scale: Tensor | None, compiled: bool):
        """(per-token loss, logit gradient or None) of a chunk of raw logits, eager or fused everywhere."""
        if not compiled:
            return _uniform_terms(z, tok, scale)
        return UNIFORM_FUSED(True, z, tok.col0, tok.in0, tok.colx, tok.inx, tok.log_r, tok.r, tok.log_r0, tok.r0,
                             scale, tok.weight)
