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

The hot path makes one host sync per call: the number of masked tokens (absorb), which sizes the
compacted tensors. The id and noise-level checks belong where data enters (`check_inputs`, on by
default; the trainer checks the loader's batches on the host and its noising yields valid x_t and
sigma by construction), and the overflow-safe forms below are branch-free arithmetic. Eagerly, a
training chunk (the weighted loss) makes five passes over its logits for absorb (shift, exp, sum,
scale, bias gradient) around its three GEMMs, fourteen for uniform; with `compile` each output of a
chunk is one fused expression (`_absorb_fused`, `_uniform_fused`).

GEMM operands may be narrower than the inputs (`gemm_dtype`: bf16 under bf16-mixed, on tensor
cores) with fp32 accumulation and fp32 logits: on CUDA `torch.mm(..., out_dtype=torch.float32)`
(torch >= 2.8); before that, and on CPU, fp32 GEMMs of the bf16-rounded operands, which is the same
arithmetic (products of bf16 numbers are exact in fp32; with TF32 enabled they are also exact in
TF32, so CUDA still runs them on tensor cores).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from packaging.version import Version
from torch import Tensor

from sedd_scale.compiled import Region
from sedd_scale.diffusion.parametrization import log_expm1

# Above this u = l - log r, the vector terms r * phi(u) are formed as e^l - r (1 + u): r * e^u alone
# could overflow while e^l does not, and e^u >> 1 + u leaves nothing to cancel.
_FAR = 40.0
GRAPHS = ("absorb", "uniform")
_MM_OUT_DTYPE = Version(torch.__version__.split("+")[0]).release >= (2, 8)  # torch.mm(..., out_dtype=)


@dataclass(frozen=True)
class ScoreEntropyHeadConfig:
    """What the fused head+loss needs to know about the graph, the chunking and the GEMM precision."""

    graph: str
    num_tokens: int
    scale_by_sigma: bool = False
    chunk_size: int = 1024
    gemm_dtype: torch.dtype | None = None  # GEMM operand dtype (None: the inputs'); accumulation stays fp32
    compile: bool = False  # fuse each chunk's elementwise work with torch.compile (model.compile)

    def __post_init__(self):
        if self.graph not in GRAPHS:
            raise ValueError(f"unknown graph {self.graph!r}; choose one of {GRAPHS}")
        if self.num_tokens < 2:
            raise ValueError(f"num_tokens must be >= 2, got {self.num_tokens}")
        if self.scale_by_sigma and self.graph != "absorb":
            raise ValueError("scale_by_sigma is only defined for the absorb graph (the reference asserts it)")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.gemm_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"gemm_dtype must be None, float32, bfloat16 or float16, got {self.gemm_dtype}")

    @property
    def graph_dim(self) -> int:
        """States per position: N + 1 (MASK) for absorb, N for uniform."""
        return self.num_tokens + (self.graph == "absorb")


def _matmul_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b as float32 (float64 stays float64): half operands with fp32 accumulation and an fp32 result."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # exact products of half operands, fp32 sums


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


def _token_terms(cfg: ScoreEntropyHeadConfig, x_t: Tensor, x_0: Tensor, sigma: Tensor,
                 vocab_start: int, n_local: int, dtype: torch.dtype) -> _Tokens:
    """Select the tokens with a nonzero loss and form their ratios in float64."""
    rows = None
    if cfg.graph == "absorb":
        rows = torch.nonzero(x_t == cfg.num_tokens).squeeze(1)  # the one host sync: sizes what follows
        x_t, x_0, sigma = x_t[rows], x_0[rows], sigma[rows]
    log_e = log_expm1(sigma.double())  # log(e^sigma - 1)
    col0 = x_0 - vocab_start
    in0 = (col0 >= 0) & (col0 < n_local)
    cast = lambda t: t.to(dtype)  # noqa: E731
    if cfg.graph == "absorb":
        shift = cast(log_e + math.log(cfg.num_tokens)) if cfg.scale_by_sigma else None
        return _Tokens(rows, col0, in0, None, None, shift, None, None, cast(-log_e), cast(torch.exp(-log_e)), 1.0)
    colx = x_t - vocab_start
    inx = (colx >= 0) & (colx < n_local)
    # log a = log E - log(E + N), without the 1 - N/(E + N) cancellation (sedd-math 9.1).
    log_a = log_e - torch.logaddexp(log_e, torch.full_like(log_e, math.log(cfg.num_tokens)))
    same = x_t == x_0
    log_r = torch.where(same, log_a, torch.zeros_like(log_a))
    return _Tokens(rows, col0, in0 & ~same, colx, inx, None, cast(log_r), cast(log_r.exp()),
                   cast(-log_a), cast(torch.exp(-log_a)), 1.0 / cfg.num_tokens)


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """The chunk's raw logits over this shard's real tokens, in the accumulation dtype."""
    if b is not None and h.dtype == w.dtype == b.dtype and h.dtype in (torch.float32, torch.float64):
        return torch.addmm(b, h, w.t())  # the bias enters the GEMM's output: no extra pass
    z = _matmul_fp32(h, w.t())
    if b is not None:
        z += b.to(z.dtype)
    return z


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


def _uniform_terms(z: Tensor, tok: _Tokens, scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(per-token loss, logit gradient or None) of a chunk of the uniform graph; consumes z (in place).

    Every entry holds r phi(u) and its gradient r expm1(u), u = l - log r, as r (t - u) + d and r t + d with
    t = expm1(min(u, FAR)) and d = e^max(l, FAR + log r) - e^(FAR + log r): for u <= FAR (every sane entry)
    d is exactly 0, and beyond it the sums are e^l - r (1 + u) and e^l - r, finite while e^l is. No branch.
    """
    col0 = torch.where(tok.in0, tok.col0, 0)
    l0 = z.gather(1, col0.unsqueeze(1)).squeeze(1)
    r = tok.r.unsqueeze(1)
    edge = (_FAR + tok.log_r).unsqueeze(1)
    d = torch.maximum(z, edge).exp_().sub_(edge.exp())
    u = z.sub_(tok.log_r.unsqueeze(1))
    t = u.clamp(max=_FAR).expm1_()
    terms = (t - u).mul_(r).add_(d)
    _put(terms, tok.col0, tok.in0, _bregman(l0, tok.log_r0, tok.r0))
    _put(terms, tok.colx, tok.inx, torch.zeros_like(l0))
    loss = terms.sum(1) * tok.weight
    if scale is None:
        return loss, None
    g = torch.mul(t, r, out=u).add_(d)
    _put(g, tok.col0, tok.in0, _bregman_grad(l0, tok.log_r0, tok.r0))
    _put(g, tok.colx, tok.inx, torch.zeros_like(l0))
    return loss, g.mul_((scale * tok.weight).to(g.dtype).unsqueeze(1))


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


def _chunk_terms(cfg: ScoreEntropyHeadConfig, z: Tensor, tok: _Tokens, scale: Tensor | None):
    """(per-token loss, logit gradient or None) of a chunk of raw logits, eager or compiled (`cfg.compile`).

    The fused absorbing chunk computes e^l once per output, which costs nothing on a GPU (memory-bound) but
    more than eager's single in-place pass on a CPU, where it stays eager; the uniform chunk is fused everywhere.
    """
    if not cfg.compile or (cfg.graph == "absorb" and z.device.type == "cpu"):
        return (_absorb_terms if cfg.graph == "absorb" else _uniform_terms)(z, tok, scale)
    if cfg.graph == "absorb":
        return ABSORB_FUSED(True, z, tok.col0, tok.in0, tok.shift, tok.log_r0, tok.r0, scale)
    return UNIFORM_FUSED(True, z, tok.col0, tok.in0, tok.colx, tok.inx, tok.log_r, tok.r, tok.log_r0, tok.r0, scale,
                         tok.weight)


class _Grads:
    """Gradient accumulators over chunks (accumulation dtype), for one call."""

    def __init__(self, n_active: int, hidden: Tensor, n_local: int, v_local: int, bias: Tensor | None, acc):
        width, device = hidden.shape[1], hidden.device
        self.h = torch.empty(n_active, width, dtype=acc, device=device)
        self.w = torch.empty(v_local, width, dtype=acc, device=device)
        self.w[n_local:].zero_()  # MASK and padding rows are never projected
        self.b = None if bias is None else torch.zeros(v_local, dtype=acc, device=device)
        self.n, self.started = n_local, False

    def add(self, s: int, e: int, g: Tensor, h: Tensor, w: Tensor) -> None:
        """Accumulate the chunk s:e with logit gradient g (chunk, n_local) and GEMM operands h (chunk, H), w."""
        if self.n == 0:
            self.h[s:e].zero_()
            return
        gm = g.to(w.dtype)  # half operands: the products run in half with fp32 accumulation
        same = gm.dtype == self.h.dtype
        if same:
            torch.mm(gm, w, out=self.h[s:e])
        else:
            self.h[s:e] = _matmul_fp32(gm, w)
        if not self.started:
            self.started = True
            if same:
                torch.mm(gm.t(), h, out=self.w[: self.n])
            else:
                self.w[: self.n] = _matmul_fp32(gm.t(), h)
        elif same:
            self.w[: self.n].addmm_(gm.t(), h)
        else:
            self.w[: self.n] += _matmul_fp32(gm.t(), h)
        if self.b is not None:
            self.b[: self.n] += g.sum(0)

    def finish(self, tok: _Tokens, hidden: Tensor, weight: Tensor, bias: Tensor | None, group) -> tuple:
        """All-reduce the hidden-state gradient over TP and return (d hidden, d weight, d bias) in input dtypes."""
        if not self.started:
            self.w.zero_()
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
    if cfg.gemm_dtype is not None:
        h_act, w = h_act.to(cfg.gemm_dtype), w.to(cfg.gemm_dtype)
    n_act = h_act.shape[0]
    partial = torch.empty(n_act, dtype=acc, device=hidden.device)
    grads = None if scale is None else _Grads(n_act, hidden, n_local, weight.shape[0], bias, acc)
    for s in range(0, n_act, cfg.chunk_size):
        e = min(s + cfg.chunk_size, n_act)
        t = tok.chunk(s, e)
        if n_local == 0:  # this shard holds only MASK / padding: nothing to add
            partial[s:e] = 0
            if grads is not None:
                grads.add(s, e, None, None, None)
            continue
        z = _chunk_logits(h_act[s:e], w, b)
        partial[s:e], g = _chunk_terms(cfg, z, t, None if scale is None else scale[s:e])
        if grads is not None:
            grads.add(s, e, g, h_act[s:e], w)
    return partial, grads


class _Context:
    """Validated inputs of one call, flattened to tokens."""

    def __init__(self, hidden, weight, bias, x_t, x_0, total_noise, cfg, vocab_start, tp_group, check_inputs):
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
        if x_t.dtype not in (torch.int64, torch.int32) or x_0.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"x_t and x_0 must hold integer token ids, got {x_t.dtype} and {x_0.dtype}")
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
        sigma = total_noise.to(x_t.device)
        if sigma.dim() == 1 and len(x_t.shape) > 1 and sigma.shape[0] == x_t.shape[0]:
            sigma = sigma.reshape(-1, *([1] * (len(x_t.shape) - 1)))  # per sequence -> per token
        self.sigma = sigma.expand(x_t.shape).reshape(-1)
        if check_inputs:
            check_token_ids(self.x_t, "x_t", cfg.graph_dim, cfg.graph, cfg.num_tokens)
            check_token_ids(self.x_0, "x_0", cfg.num_tokens, cfg.graph, cfg.num_tokens)
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


def check_token_ids(x: Tensor, name: str, high: int, graph: str, num_tokens: int) -> None:
    """Raise a ValueError naming the range unless every id of `x` is in [0, high) (a host sync on a device)."""
    if not x.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(x))  # one pass over the ids (min and max were two)
    if lo < 0 or hi >= high:
        raise ValueError(f"{name} holds ids in [{lo}, {hi}] outside [0, {high}) for the "
                         f"{graph} graph with num_tokens={num_tokens}: check the tokenizer/vocab settings")


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
        # Scaled unconditionally (x * 1 is exact): testing grad_total == 1 would be a host sync.
        gh, gw = gh.mul_(grad_total.to(gh.dtype)), gw.mul_(grad_total.to(gw.dtype))
        gb = None if gb is None else gb.mul_(grad_total.to(gb.dtype))
        return gh.reshape(ctx.hidden_shape), gw, gb, None, None, None


def score_entropy_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, x_t: Tensor, x_0: Tensor,
                       total_noise: Tensor, cfg: ScoreEntropyHeadConfig, *, vocab_start: int | None = None,
                       tp_group: dist.ProcessGroup | None = None, check_inputs: bool = True) -> Tensor:
    """Per-token score entropy (no rate weight), shape of x_t, from hidden (*x_t.shape, H) and this rank's head shard.

    `total_noise` is per sequence (B,) or per token; `vocab_start` defaults to rank * V_local (megatron's
    layout); `tp_group` defaults to megatron-core's TP group (none when torch.distributed is not running);
    `check_inputs` checks the ids' range and total_noise > 0 (host syncs; skip them for inputs valid by
    construction). Gradients flow to hidden (all-reduced over TP), weight and bias; backward recomputes each chunk.
    """
    c = _Context(hidden, weight, bias, x_t, x_0, total_noise, cfg, vocab_start, tp_group, check_inputs)
    return _PerTokenScoreEntropy.apply(hidden, weight, bias, c, cfg)


def weighted_score_entropy_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, x_t: Tensor, x_0: Tensor,
                                total_noise: Tensor, token_weight: Tensor, cfg: ScoreEntropyHeadConfig, *,
                                vocab_start: int | None = None, tp_group: dist.ProcessGroup | None = None,
                                check_inputs: bool = True) -> tuple[Tensor, Tensor]:
    """(sum_t token_weight_t * loss_t, per-token loss detached): the training objective in one pass.

    `token_weight` (broadcastable to x_t, e.g. rate(t)[:, None] / batch) is a constant. The gradients are
    computed during the forward pass, so each chunk is projected once and backward only rescales them: the
    cheapest path when the loss is only backpropagated once (training). Other arguments as `score_entropy_head`.
    """
    if token_weight.requires_grad:
        raise ValueError("token_weight must not require grad: the loss is not differentiated w.r.t. it")
    c = _Context(hidden, weight, bias, x_t, x_0, total_noise, cfg, vocab_start, tp_group, check_inputs)
    tw = token_weight.to(x_t.device)
    if tw.dim() == 1 and x_t.dim() > 1 and tw.shape[0] == x_t.shape[0]:
        tw = tw.reshape(-1, *([1] * (x_t.dim() - 1)))
    tw = tw.expand(x_t.shape)
    return _WeightedScoreEntropy.apply(hidden, weight, bias, tw, c, cfg)
