"""Score entropy fused with the vocabulary-parallel output head, chunked over tokens (sedd-math 2.1).

Each tensor-parallel (TP) rank holds rows [vocab_start, vocab_start + V_local) of the head
(megatron `ColumnParallelLinear(H -> V_pad, gather_output=False)`). Every score-entropy term is
per vocabulary entry, r_y * phi(l_y - log r_y) with phi(u) = expm1(u) - u >= 0 (the Bregman form
of sedd-math 2.1; r_y = 0 gives e^l_y), so a rank sums the terms of its own entries and one
all-reduce of one number per token combines the ranks. The sum of non-negative terms keeps full
relative precision, unlike the equivalent exp-sum / log-sum split, which cancels near the optimum.
The gradient d/dl_y = r_y * expm1(l_y - log r_y) = e^l_y - r_y is purely local: no collective is
needed for it, only for the hidden-state gradient (a sum over the ranks' vocabulary shards).

Tokens are processed in chunks of `chunk_size`: a chunk's logits (chunk x V_local, float32) are
projected, reduced and dropped, and recomputed in backward, so memory does not grow with
batch x length. Only real tokens y < N enter: the MASK column (absorb) and vocabulary padding are
never projected. For the absorbing graph only masked positions have a nonzero loss, so only they
are projected at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sedd_scale.diffusion.parametrization import log_expm1

# Above this u = l - log r, r * phi(u) is formed as e^l - r (1 + u): r * e^u alone could overflow
# while e^l does not, and e^u >> 1 + u leaves nothing to cancel.
_FAR = 40.0
GRAPHS = ("absorb", "uniform")


@dataclass(frozen=True)
class ScoreEntropyHeadConfig:
    """What the fused head+loss needs to know about the graph and the chunking."""

    graph: str
    num_tokens: int
    scale_by_sigma: bool = False
    chunk_size: int = 1024

    def __post_init__(self):
        if self.graph not in GRAPHS:
            raise ValueError(f"unknown graph {self.graph!r}; choose one of {GRAPHS}")
        if self.num_tokens < 2:
            raise ValueError(f"num_tokens must be >= 2, got {self.num_tokens}")
        if self.scale_by_sigma and self.graph != "absorb":
            raise ValueError("scale_by_sigma is only defined for the absorb graph (the reference asserts it)")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def graph_dim(self) -> int:
        """States per position: N + 1 (MASK) for absorb, N for uniform."""
        return self.num_tokens + (self.graph == "absorb")


def _matmul_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b as float32 (float64 stays float64): half inputs accumulate in fp32, and CUDA keeps the fp32 result."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _bregman_(l: Tensor, log_r: Tensor, r: Tensor) -> Tensor:
    """r * phi(l - log r), phi(u) = expm1(u) - u, reusing l's storage; finite while e^l is."""
    u = l.sub_(log_r)
    out = u.clamp(max=_FAR).expm1_().sub_(u).mul_(r)
    far = u > _FAR
    if bool(far.any()):  # rare (l up to ~88 with a tiny r): the branch costs a few extra passes
        out = torch.where(far, (u + log_r).exp_() - r * (1.0 + u), out)
    return out


def _bregman_grad(l: Tensor, log_r: Tensor, r: Tensor) -> Tensor:
    """d/dl of r * phi(l - log r) = r * expm1(l - log r), without overflow (vectors only)."""
    u = l - log_r
    return torch.where(u > _FAR, l.exp() - r, r * torch.expm1(u.clamp(max=_FAR)))


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
    colx: Tensor
    inx: Tensor  # x_t's (self, excluded) entry is in this shard (uniform only)
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


def _token_terms(cfg: ScoreEntropyHeadConfig, x_t: Tensor, x_0: Tensor, sigma: Tensor,
                 vocab_start: int, n_local: int, dtype: torch.dtype) -> _Tokens:
    """Select the tokens with a nonzero loss and form their ratios in float64."""
    rows = None
    if cfg.graph == "absorb":
        rows = torch.nonzero(x_t == cfg.num_tokens).squeeze(1)
        x_t, x_0, sigma = x_t[rows], x_0[rows], sigma[rows]
    log_e = log_expm1(sigma.double())  # log(e^sigma - 1)
    col0, colx = x_0 - vocab_start, x_t - vocab_start
    in0 = (col0 >= 0) & (col0 < n_local)
    inx = (colx >= 0) & (colx < n_local)
    cast = lambda t: t.to(dtype)  # noqa: E731
    if cfg.graph == "absorb":
        shift = cast(log_e + math.log(cfg.num_tokens)) if cfg.scale_by_sigma else None
        return _Tokens(rows, col0, in0, colx, torch.zeros_like(inx), shift, None, None,
                       cast(-log_e), cast(torch.exp(-log_e)), 1.0)
    # log a = log E - log(E + N), without the 1 - N/(E + N) cancellation (sedd-math 9.1).
    log_a = log_e - torch.logaddexp(log_e, torch.full_like(log_e, math.log(cfg.num_tokens)))
    same = x_t == x_0
    log_r = torch.where(same, log_a, torch.zeros_like(log_a))
    return _Tokens(rows, col0, in0 & ~same, colx, inx, None, cast(log_r), cast(log_r.exp()),
                   cast(-log_a), cast(torch.exp(-log_a)), 1.0 / cfg.num_tokens)


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None, tok: _Tokens) -> Tensor:
    """The chunk's log-scores over this shard's real tokens (the current token's value is irrelevant)."""
    z = _matmul_fp32(h, w.t())
    if b is not None:
        z += b.to(z.dtype)
    if tok.shift is not None:
        z -= tok.shift.unsqueeze(1)
    return z


def _chunk_loss(z: Tensor, tok: _Tokens, graph: str) -> Tensor:
    """This shard's part of the per-token score entropy; consumes z."""
    if z.shape[1] == 0:
        return z.new_zeros(z.shape[0])
    l0 = z.gather(1, torch.where(tok.in0, tok.col0, 0).unsqueeze(1)).squeeze(1)
    t0 = _bregman_(l0, tok.log_r0, tok.r0)
    terms = z.exp_() if graph == "absorb" else _bregman_(z, tok.log_r.unsqueeze(1), tok.r.unsqueeze(1))
    _put(terms, tok.col0, tok.in0, t0)
    _put(terms, tok.colx, tok.inx, torch.zeros_like(t0))
    return terms.sum(1) * tok.weight


def _chunk_grad(z: Tensor, tok: _Tokens, scale: Tensor) -> Tensor:
    """d(sum_t scale_t * loss_t)/d logits for the chunk: scale * w * (e^l - r); consumes z."""
    if z.shape[1] == 0:
        return z
    l0 = z.gather(1, torch.where(tok.in0, tok.col0, 0).unsqueeze(1)).squeeze(1)
    g = z.exp_()
    if tok.r is not None:
        g -= tok.r.unsqueeze(1)
    _put(g, tok.col0, tok.in0, _bregman_grad(l0, tok.log_r0, tok.r0))
    _put(g, tok.colx, tok.inx, torch.zeros_like(l0))
    return g.mul_((scale * tok.weight).to(g.dtype).unsqueeze(1))


class _Grads:
    """Gradient accumulators over chunks (accumulation dtype), for one call."""

    def __init__(self, n_active: int, hidden: Tensor, n_local: int, v_local: int, bias: Tensor | None, acc):
        self.h = torch.zeros(n_active, hidden.shape[1], dtype=acc, device=hidden.device)
        self.w = torch.zeros(v_local, hidden.shape[1], dtype=acc, device=hidden.device)
        self.b = None if bias is None else torch.zeros(v_local, dtype=acc, device=hidden.device)
        self.n = n_local

    def add(self, s: int, e: int, g: Tensor, h: Tensor, w: Tensor) -> None:
        """Accumulate the chunk s:e with logit gradient g (chunk, n_local) and inputs h (chunk, H)."""
        if self.n == 0:
            return
        gm = g.to(w.dtype)  # half weights: the products run in half with fp32 accumulation
        self.h[s:e] = _matmul_fp32(gm, w)
        self.w[: self.n] += _matmul_fp32(gm.t(), h)
        if self.b is not None:
            self.b[: self.n] += g.sum(0)

    def finish(self, tok: _Tokens, hidden: Tensor, weight: Tensor, bias: Tensor | None, group) -> tuple:
        """All-reduce the hidden-state gradient over TP and return (d hidden, d weight, d bias) in input dtypes."""
        # Bypassing ColumnParallelLinear.forward also bypasses its copy-to-TP-region, whose backward
        # is exactly this all-reduce: each rank only saw its own vocabulary rows.
        _all_reduce(self.h, group)
        if tok.rows is None:
            gh = self.h.to(hidden.dtype)
        else:
            gh = torch.zeros_like(hidden).index_copy_(0, tok.rows, self.h.to(hidden.dtype))
        return gh, self.w.to(weight.dtype), None if self.b is None else self.b.to(bias.dtype)


def _all_reduce(t: Tensor, group) -> None:
    """In-place sum over the TP group (nothing for a single rank)."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)


def _forward_chunks(hidden, weight, bias, tok, cfg, n_local, acc, scale=None):
    """Per-token partial losses of the active tokens and, when `scale` is given, the gradients."""
    h_act = hidden if tok.rows is None else hidden.index_select(0, tok.rows)
    w, b = weight[:n_local], None if bias is None else bias[:n_local]
    n_act = h_act.shape[0]
    partial = torch.empty(n_act, dtype=acc, device=hidden.device)
    grads = None if scale is None else _Grads(n_act, hidden, n_local, weight.shape[0], bias, acc)
    for s in range(0, n_act, cfg.chunk_size):
        e = min(s + cfg.chunk_size, n_act)
        t = tok.chunk(s, e)
        z = _chunk_logits(h_act[s:e], w, b, t)
        if grads is not None:
            grads.add(s, e, _chunk_grad(z.clone(), t, scale[s:e]), h_act[s:e], w)
        partial[s:e] = _chunk_loss(z, t, cfg.graph)
    return partial, grads


class _Context:
    """Validated inputs of one call, flattened to tokens."""

    def __init__(self, hidden, weight, bias, x_t, x_0, total_noise, cfg, vocab_start, tp_group):
        if x_t.shape != x_0.shape:
            raise ValueError(f"x_t {tuple(x_t.shape)} and x_0 {tuple(x_0.shape)} must have the same shape")
        if hidden.shape[:-1] != x_t.shape:
            raise ValueError(f"hidden {tuple(hidden.shape)} must be (*tokens, H) for tokens {tuple(x_t.shape)}")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"weight must be (V_local, H={hidden.shape[-1]}), got {tuple(weight.shape)}")
        if weight.dtype != hidden.dtype:
            raise ValueError(f"hidden ({hidden.dtype}) and head weight ({weight.dtype}) must share a dtype")
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be (V_local={weight.shape[0]},), got {tuple(bias.shape)}")
        if total_noise.requires_grad:
            raise ValueError("total_noise must not require grad: the loss is not differentiated w.r.t. it")
        self.shape = x_t.shape
        self.group = _resolve_group(tp_group)
        tp = 1 if self.group is None else dist.get_world_size(self.group)
        rank = 0 if self.group is None else dist.get_rank(self.group)
        v_local = weight.shape[0]
        self.vocab_start = rank * v_local if vocab_start is None else vocab_start
        if v_local * tp < cfg.graph_dim:
            raise ValueError(f"the head covers {v_local} x {tp} ranks = {v_local * tp} entries but the "
                             f"{cfg.graph} graph has {cfg.graph_dim} states: wrong num_tokens or vocab padding")
        self.n_local = max(0, min(cfg.num_tokens - self.vocab_start, v_local))
        self.x_t, self.x_0 = x_t.reshape(-1), x_0.reshape(-1)
        _check_ids(self.x_t, "x_t", cfg.graph_dim, cfg)
        _check_ids(self.x_0, "x_0", cfg.num_tokens, cfg)
        sigma = total_noise.to(x_t.device)
        if sigma.dim() == 1 and len(x_t.shape) > 1 and sigma.shape[0] == x_t.shape[0]:
            sigma = sigma.reshape(-1, *([1] * (len(x_t.shape) - 1)))  # per sequence -> per token
        self.sigma = sigma.expand(x_t.shape).reshape(-1)
        if self.sigma.numel() and not bool((self.sigma > 0).all()):
            raise ValueError("total_noise must be > 0 (the loss has 1/(e^sigma - 1) terms); sample t > 0")
        self.acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        self.tok = _token_terms(cfg, self.x_t, self.x_0, self.sigma, self.vocab_start, self.n_local, self.acc)

    def per_token(self, partial: Tensor) -> Tensor:
        """Scatter the active tokens' losses into a (*tokens) tensor (zeros elsewhere)."""
        if self.tok.rows is None:
            return partial.reshape(self.shape)
        out = partial.new_zeros(self.x_t.shape[0]).index_copy_(0, self.tok.rows, partial)
        return out.reshape(self.shape)


def _check_ids(x: Tensor, name: str, high: int, cfg: ScoreEntropyHeadConfig) -> None:
    if x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold integer token ids, got {x.dtype}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= high):
        raise ValueError(f"{name} holds ids in [{int(x.min())}, {int(x.max())}] outside [0, {high}) for the "
                         f"{cfg.graph} graph with num_tokens={cfg.num_tokens}: check the tokenizer/vocab settings")


def _resolve_group(tp_group):
    """The explicit group; else megatron-core's TP group; a single rank when torch.distributed is not running."""
    if tp_group is not None or not dist.is_initialized():
        return tp_group
    from sedd_scale import compat  # noqa: F401  (before megatron.core)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("torch.distributed is running but megatron-core model parallelism is not initialized: "
                           "call parallel_state.initialize_model_parallel(...) or pass tp_group explicitly")
    return parallel_state.get_tensor_model_parallel_group()


class _PerTokenScoreEntropy(torch.autograd.Function):
    """Per-token loss; backward recomputes each chunk's logits (4 projections in all, memory O(chunk))."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, c: _Context, cfg: ScoreEntropyHeadConfig):
        partial, _ = _forward_chunks(c.hidden, weight, bias, c.tok, cfg, c.n_local, c.acc)
        _all_reduce(partial, c.group)
        ctx.save_for_backward(hidden, weight, bias)
        c.hidden = None  # the saved (version-checked) input is used in backward
        ctx.c, ctx.cfg = c, cfg
        return c.per_token(partial)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias = ctx.saved_tensors
        c, cfg = ctx.c, ctx.cfg
        flat = hidden.reshape(-1, hidden.shape[-1])
        scale = grad_out.reshape(-1).to(c.acc)
        if c.tok.rows is not None:
            scale = scale[c.tok.rows]
        _, grads = _forward_chunks(flat, weight, bias, c.tok, cfg, c.n_local, c.acc, scale=scale)
        gh, gw, gb = grads.finish(c.tok, flat, weight, bias, c.group)
        return gh.reshape(hidden.shape), gw, gb, None, None


class _WeightedScoreEntropy(torch.autograd.Function):
    """sum_t w_t loss_t with the gradients formed in the forward pass (3 projections); backward only scales."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_weight: Tensor, c: _Context, cfg: ScoreEntropyHeadConfig):
        scale = token_weight.reshape(-1).to(c.acc)
        if c.tok.rows is not None:
            scale = scale[c.tok.rows]
        need = any(ctx.needs_input_grad[:3])
        partial, grads = _forward_chunks(c.hidden, weight, bias, c.tok, cfg, c.n_local, c.acc,
                                            scale=scale if need else None)
        _all_reduce(partial, c.group)
        ctx.grads = None if grads is None else grads.finish(c.tok, c.hidden, weight, bias, c.group)
        ctx.hidden_shape = hidden.shape
        per_token = c.per_token(partial)
        ctx.mark_non_differentiable(per_token)
        return (scale * partial).sum(), per_token

    @staticmethod
    def backward(ctx, grad_total, _grad_per_token):
        if ctx.grads is None:
            raise RuntimeError("weighted_score_entropy_head: backward ran twice (its gradients are formed once in "
                               "forward and released); call it again to differentiate again")
        gh, gw, gb = ctx.grads
        ctx.grads = None
        if not bool(grad_total == 1):  # e.g. the loss divided by gradient-accumulation steps
            gh, gw = gh.mul_(grad_total.to(gh.dtype)), gw.mul_(grad_total.to(gw.dtype))
            gb = None if gb is None else gb.mul_(grad_total.to(gb.dtype))
        return gh.reshape(ctx.hidden_shape), gw, gb, None, None, None


def score_entropy_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, x_t: Tensor, x_0: Tensor,
                       total_noise: Tensor, cfg: ScoreEntropyHeadConfig, *, vocab_start: int | None = None,
                       tp_group: dist.ProcessGroup | None = None) -> Tensor:
    """Per-token score entropy (no rate weight), shape of x_t, from hidden (*x_t.shape, H) and this rank's head shard.

    `total_noise` is per sequence (B,) or per token; `vocab_start` defaults to rank * V_local (megatron's
    layout); `tp_group` defaults to megatron-core's TP group (none when torch.distributed is not running).
    Gradients flow to hidden (all-reduced over TP), weight and bias; backward recomputes each chunk.
    """
    c = _Context(hidden, weight, bias, x_t, x_0, total_noise, cfg, vocab_start, tp_group)
    return _PerTokenScoreEntropy.apply(hidden, weight, bias, c, cfg)


def weighted_score_entropy_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, x_t: Tensor, x_0: Tensor,
                                total_noise: Tensor, token_weight: Tensor, cfg: ScoreEntropyHeadConfig, *,
                                vocab_start: int | None = None,
                                tp_group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
    """(sum_t token_weight_t * loss_t, per-token loss detached): the training objective in one pass.

    `token_weight` (broadcastable to x_t, e.g. rate(t)[:, None] / batch) is a constant. The gradients are
    computed during the forward pass, so each chunk is projected once and backward only rescales them: the
    cheapest path when the loss is only backpropagated once (training).
    """
    if token_weight.requires_grad:
        raise ValueError("token_weight must not require grad: the loss is not differentiated w.r.t. it")
    c = _Context(hidden, weight, bias, x_t, x_0, total_noise, cfg, vocab_start, tp_group)
    tw = token_weight.to(x_t.device)
    if tw.dim() == 1 and x_t.dim() > 1 and tw.shape[0] == x_t.shape[0]:
        tw = tw.reshape(-1, *([1] * (x_t.dim() - 1)))
    tw = tw.expand(x_t.shape)
    return _WeightedScoreEntropy.apply(hidden, weight, bias, tw, c, cfg)
