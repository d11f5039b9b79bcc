"""An objective (`objectives.py`; score entropy: `score_entropy.py`) fused with the vocabulary-parallel output
head, chunked over tokens (sedd-math 2.1).

Each tensor-parallel (TP) rank holds rows [vocab_start, vocab_start + V_local) of the head
(megatron `ColumnParallelLinear(H -> V_pad, gather_output=False)`). Every score-entropy term is
per vocabulary entry, r_y * phi(l_y - log r_y) with phi(u) = expm1(u) - u >= 0 (the Bregman form
of sedd-math 2.1; r_y = 0 gives e^l_y), so a rank sums the terms of its own entries and one
all-reduce of one number per token combines the ranks. The sum of non-negative terms keeps full
relative precision, unlike the equivalent exp-sum / log-sum split, which cancels near the optimum.
The gradient d/dl_y = r_y * expm1(l_y - log r_y) = e^l_y - r_y is purely local: no collective is
needed for it, only for the hidden-state gradient (a sum over the ranks' vocabulary shards).

A normalized objective (masked cross-entropy, `masked_ce.py`) needs the softmax normalizer over every shard:
each chunk's per-token log-sum-exp of the shard's real tokens is combined across the TP group in one all-gather
before its terms are formed; its per-token partials and logit gradients are then local as above.

Tokens are processed in chunks: a chunk's logits (chunk x V_local, float32) are projected into one
buffer reused by every chunk, reduced and dropped, and recomputed in backward, so memory does not grow
with batch x length. A chunk holds `chunk_size` tokens, or by default as many as `chunk_bytes` (64 MiB)
of logits hold: TP shards, V_local = V / TP wide, take TP times more tokens per chunk (every rank of a
TP group the same number, so a normalized objective's collectives pair up). Only real
tokens y < N enter: the MASK column (absorb) and vocabulary padding are never projected. For the
absorbing graph only masked positions have a nonzero loss, so only they are projected at all.

The hot path makes one host sync per call: the number of masked tokens (absorb), which sizes the
compacted tensors. The id and noise-level checks belong where data enters (`check_inputs`, on by
default; the trainer checks the loader's batches on the host and its noising yields valid x_t and
sigma by construction), and the overflow-safe forms below are branch-free arithmetic. Eagerly, a
training chunk (the weighted loss) makes five passes over its logits for absorb (shift, exp, sum,
scale, bias gradient) around its three GEMMs, twelve for uniform (on a CPU in blocks of rows that stay
in the cache: `score_entropy._uniform_terms`); with `compile` each output of a chunk is one fused
expression (`score_entropy._absorb_fused`, `_uniform_fused`).

GEMM operands may be narrower than the inputs (`gemm_dtype`: bf16 under bf16-mixed, on tensor
cores) with fp32 accumulation and fp32 logits: on CUDA `torch.mm(..., out_dtype=torch.float32)`
(torch >= 2.8); before that, and on CPU, fp32 GEMMs of the bf16-rounded operands, which is the same
arithmetic (products of bf16 numbers are exact in fp32; with TF32 enabled they are also exact in
TF32, so CUDA still runs them on tensor cores).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from packaging.version import Version
from torch import Tensor

from sedd_scale.diffusion.graph import check_token_ids
from sedd_scale.diffusion.parametrization import shard_logsumexp
from sedd_scale.loss.objectives import HeadObjective, Selected, head_objective, is_normalized

_MM_OUT_DTYPE = Version(torch.__version__.split("+")[0]).release >= (2, 8)  # torch.mm(..., out_dtype=)
# Default logits per chunk: 64 MiB (GPT-2's vocabulary: 333 tokens per chunk at TP 1, 2668 at TP 8). Big enough for
# efficient GEMMs, small beside the head's weight gradient (V_local x H fp32) that the loss holds anyway.
CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class HeadLossConfig:
    """What the fused head+loss needs: the objective (graph terms, which rows are projected), the chunking and
    the GEMM precision."""

    objective: HeadObjective
    chunk_size: int | None = None  # tokens per chunk; None: as many as `chunk_bytes` of logits hold
    gemm_dtype: torch.dtype | None = None  # GEMM operand dtype (None: the inputs'); accumulation stays fp32
    compile: bool = False  # fuse each chunk's elementwise work with torch.compile (model.compile)
    chunk_bytes: int = CHUNK_BYTES  # a chunk's logits (chunk x V_local, accumulation dtype) when chunk_size is None

    def __post_init__(self):
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (or None: sized by chunk_bytes), got {self.chunk_size}")
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")
        if self.gemm_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"gemm_dtype must be None, float32, bfloat16 or float16, got {self.gemm_dtype}")

    def chunk_rows(self, v_local: int, itemsize: int = 4) -> int:
        """Tokens per chunk for a head shard of `v_local` rows and logits of `itemsize` bytes: chunk_size, or what
        fits chunk_bytes (so a TP shard, V / TP rows, takes TP times more tokens per chunk). By the shard's width,
        not its real tokens: every rank of a TP group cuts the same chunks."""
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, self.chunk_bytes // max(1, v_local * itemsize))

    @classmethod
    def for_graph(cls, graph: str, num_tokens: int, scale_by_sigma: bool = False, chunk_size: int | None = None,
                  gemm_dtype: torch.dtype | None = None, compile: bool = False, *,
                  objective: str = "score_entropy") -> "HeadLossConfig":
        """The config of the registered objective `objective` (default: score entropy) on `graph`."""
        return cls(head_objective(objective, graph, num_tokens, scale_by_sigma=scale_by_sigma), chunk_size,
                   gemm_dtype, compile)


def _matmul_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b as float32 (float64 stays float64): half operands with fp32 accumulation and an fp32 result."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # exact products of half operands, fp32 sums


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> Tensor:
    """The chunk's raw logits over this shard's real tokens, in the accumulation dtype (in `out` where it can)."""
    if h.dtype == w.dtype == out.dtype and h.dtype in (torch.float32, torch.float64):
        if b is None:
            return torch.mm(h, w.t(), out=out)
        if b.dtype == h.dtype:
            return torch.addmm(b, h, w.t(), out=out)  # the bias enters the GEMM's output: no extra pass
    z = _matmul_fp32(h, w.t())
    if b is not None:
        z += b.to(z.dtype)
    return z



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

    def finish(self, tok: Selected, hidden: Tensor, weight: Tensor, bias: Tensor | None, group,
               reduce_hidden: bool = True) -> tuple:
        """All-reduce the hidden-state gradient over TP (unless the caller's gather reduces it) and return
        (d hidden, d weight, d bias) in input dtypes."""
        if not self.started:
            self.w.zero_()
        # Bypassing ColumnParallelLinear.forward also bypasses its copy-to-TP-region, whose backward
        # is exactly this all-reduce: each rank only saw its own vocabulary rows.
        if reduce_hidden:
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


def _forward_chunks(hidden, weight, bias, tok, cfg, n_local, acc, scale=None, group=None):
    """Per-token partial losses of the active tokens and, when `scale` is given, the gradients. A normalized
    objective also gets each chunk's log-sum-exp over the real tokens of every shard (one collective per chunk,
    which every rank of `group` joins)."""
    normalized = is_normalized(cfg.objective)
    h_act = hidden if tok.rows is None else hidden.index_select(0, tok.rows)
    w, b = weight[:n_local], None if bias is None else bias[:n_local]
    if cfg.gemm_dtype is not None:
        h_act, w = h_act.to(cfg.gemm_dtype), w.to(cfg.gemm_dtype)
    n_act = h_act.shape[0]
    partial = torch.empty(n_act, dtype=acc, device=hidden.device)
    grads = None if scale is None else _Grads(n_act, hidden, n_local, weight.shape[0], bias, acc)
    rows = cfg.chunk_rows(weight.shape[0], acc.itemsize)
    # One logits buffer for every chunk: on a CPU a fresh one would be fresh pages (faults) every chunk.
    buf = torch.empty(min(rows, n_act) * n_local, dtype=acc, device=hidden.device)
    for s in range(0, n_act, rows):
        e = min(s + rows, n_act)
        t = tok.chunk(s, e)
        if n_local == 0:  # this shard holds only MASK / padding: nothing to add
            if normalized:  # but the others' normalizer needs its (empty) share
                shard_logsumexp(partial.new_empty(e - s, 0), 0, group)
            partial[s:e] = 0
            if grads is not None:
                grads.add(s, e, None, None, None)
            continue
        z = _chunk_logits(h_act[s:e], w, b, buf[: (e - s) * n_local].view(e - s, n_local))
        extra = {"lse": shard_logsumexp(z, n_local, group)} if normalized else {}
        partial[s:e], g = cfg.objective.terms(z, t, None if scale is None else scale[s:e], cfg.compile, **extra)
        if grads is not None:
            grads.add(s, e, g, h_act[s:e], w)
    return partial, grads


class _Context:
    """Validated inputs of one call, flattened to tokens."""

    def __init__(self, hidden, weight, bias, x_t, x_0, total_noise, cfg, vocab_start, tp_group, check_inputs,
                 sequence_parallel=False):
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
        self.reduce_hidden = not sequence_parallel
        tp = 1 if self.group is None else dist.get_world_size(self.group)
        rank = 0 if self.group is None else dist.get_rank(self.group)
        v_local = weight.shape[0]
        self.vocab_start = rank * v_local if vocab_start is None else vocab_start
        if v_local * tp < cfg.objective.graph_dim:
            raise ValueError(f"the head covers {v_local} x {tp} ranks = {v_local * tp} entries but the "
                             f"{cfg.objective.graph} graph has {cfg.objective.graph_dim} states: wrong num_tokens or "
                             "vocab padding")
        self.n_local = max(0, min(cfg.objective.num_tokens - self.vocab_start, v_local))
        self.x_t, self.x_0 = x_t.reshape(-1), x_0.reshape(-1)
        sigma = total_noise.to(x_t.device)
        if sigma.dim() == 1 and len(x_t.shape) > 1 and sigma.shape[0] == x_t.shape[0]:
            sigma = sigma.reshape(-1, *([1] * (len(x_t.shape) - 1)))  # per sequence -> per token
        self.sigma = sigma.expand(x_t.shape).reshape(-1)
        if check_inputs:
            check_token_ids(self.x_t, "x_t", cfg.objective.graph_dim, cfg.objective.graph, cfg.objective.num_tokens)
            check_token_ids(self.x_0, "x_0", cfg.objective.num_tokens, cfg.objective.graph, cfg.objective.num_tokens)
            if self.sigma.numel() and not bool((self.sigma > 0).all()):
                raise ValueError("total_noise must be > 0 (the loss has 1/(e^sigma - 1) terms); sample t > 0")
        self.acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        self.tok = cfg.objective.select(self.x_t, self.x_0, self.sigma, self.vocab_start, self.n_local, self.acc)

    def per_token(self, partial: Tensor) -> Tensor:
        """Scatter the active tokens' losses into a (*tokens) tensor (zeros elsewhere)."""
        if self.tok.rows is None:
            return partial.reshape(self.shape)
        out = partial.new_zeros(self.x_t.shape[0]).index_copy_(0, self.tok.rows, partial)
        return out.reshape(self.shape)


def _resolve_group(tp_group):
    """The explicit group; else megatron-core's TP group; a single rank when torch.distributed is not running."""
    if tp_group is not None or not dist.is_initialized():
        return tp_group
    import sedd_scale.compat  # noqa: F401  (before megatron.core)

    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("torch.distributed is running but megatron-core model parallelism is not initialized: "
                           "call parallel_state.initialize_model_parallel(...) or pass tp_group explicitly")
    return parallel_state.get_tensor_model_parallel_group()


class _PerTokenScoreEntropy(torch.autograd.Function):
    """Per-token loss; backward recomputes each chunk's logits (4 projections in all, memory O(chunk))."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, c: _Context, cfg: HeadLossConfig):
        partial, _ = _forward_chunks(c.hidden, weight, bias, c.tok, cfg, c.n_local, c.acc, group=c.group)
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
        _, grads = _forward_chunks(flat, weight, bias, c.tok, cfg, c.n_local, c.acc, scale=scale, group=c.group)
        gh, gw, gb = grads.finish(c.tok, flat, weight, bias, c.group, c.reduce_hidden)
        return gh.reshape(hidden.shape), gw, gb, None, None


class _WeightedScoreEntropy(torch.autograd.Function):
    """sum_t w_t loss_t with the gradients formed in the forward pass (3 projections); backward only scales."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_weight: Tensor, c: _Context, cfg: HeadLossConfig):
        scale = token_weight.reshape(-1).to(c.acc)
        if c.tok.rows is not None:
            scale = scale[c.tok.rows]
        need = any(ctx.needs_input_grad[:3])
        partial, grads = _forward_chunks(c.hidden, weight, bias, c.tok, cfg, c.n_local, c.acc,
                                         scale=scale if need else None, group=c.group)
        _all_reduce(partial, c.group)
        ctx.grads = None if grads is None else grads.finish(c.tok, c.hidden, weight, bias, c.group, c.reduce_hidden)
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
                       total_noise: Tensor, cfg: HeadLossConfig, *, vocab_start: int | None = None,
                       tp_group: dist.ProcessGroup | None = None, check_inputs: bool = True,
                       sequence_parallel: bool = False) -> Tensor:
    """Per-token score entropy (no rate weight), shape of x_t, from hidden (*x_t.shape, H) and this rank's head shard.

    `total_noise` is per sequence (B,) or per token; `vocab_start` defaults to rank * V_local (megatron's
    layout); `tp_group` defaults to megatron-core's TP group (none when torch.distributed is not running);
    `check_inputs` checks the ids' range and total_noise > 0 (host syncs; skip them for inputs valid by
    construction). Gradients flow to hidden (all-reduced over TP), weight and bias; backward recomputes each chunk.
    `sequence_parallel`: hidden is the all-gather of sequence-parallel shards, whose backward reduce-scatters its
    gradient over TP (megatron-core's gather_from_sequence_parallel_region): the hidden gradient is left unreduced.
    """
    c = _Context(hidden, weight, bias, x_t, x_0, total_noise, cfg, vocab_start, tp_group, check_inputs,
                 sequence_parallel)
    return _PerTokenScoreEntropy.apply(hidden, weight, bias, c, cfg)


def weighted_score_entropy_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, x_t: Tensor, x_0: Tensor,
                                total_noise: Tensor, token_weight: Tensor, cfg: HeadLossConfig, *,
                                vocab_start: int | None = None, tp_group: dist.ProcessGroup | None = None,
                                check_inputs: bool = True, sequence_parallel: bool = False) -> tuple[Tensor, Tensor]:
    """(sum_t token_weight_t * loss_t, per-token loss detached): the training objective in one pass.

    `token_weight` (broadcastable to x_t, e.g. rate(t)[:, None] / batch) is a constant. The gradients are
    computed during the forward pass, so each chunk is projected once and backward only rescales them: the
    cheapest path when the loss is only backpropagated once (training). Other arguments as `score_entropy_head`.
    """
    if token_weight.requires_grad:
        raise ValueError("token_weight must not require grad: the loss is not differentiated w.r.t. it")
    c = _Context(hidden, weight, bias, x_t, x_0, total_noise, cfg, vocab_start, tp_group, check_inputs,
                 sequence_parallel)
    tw = token_weight.to(x_t.device)
    if tw.dim() == 1 and x_t.dim() > 1 and tw.shape[0] == x_t.shape[0]:
        tw = tw.reshape(-1, *([1] * (x_t.dim() - 1)))
    tw = tw.expand(x_t.shape)
    return _WeightedScoreEntropy.apply(hidden, weight, bias, tw, c, cfg)
