"""One training step, side by side: this framework's step vs the reference's step re-implemented, same dims, fp32.

    python benchmarks/bench_step.py                          # every case, 2 threads (several minutes)
    python benchmarks/bench_step.py --cases tiny-absorb --rounds 20
    python benchmarks/bench_step.py --threads 8              # another machine
    python benchmarks/bench_step.py --no-reference-ddp       # the reference's modules without its DDP wrapper

Ours is `Trainer.train_step()` as `sedd_scale.train` runs it: layout-independent noising, the model under
DeepSpeed (one process, ZeRO-0, gradient clipping 1.0), the fused vocab-parallel loss, AdamW, the EMA
update. Each variant is its own trainer, built with every compile switch set from the variant's name
(`VARIANTS`: `model.compile`, from which the fused loss's `compile` and the LayerNorm kernel choice are
derived when the trainer is built); both are built with the same seed, so they start from the same
weights. The benchmark asserts that a variant is what its name says: before and after the rounds, every
compile switch held by the built trainer (`compile_flags`: the recipe's model config, every module's
config, the fused loss's config) must equal the name's, and on a variant's first step every compiled
region (`sedd_scale.compiled.Region`) it calls must be called with the name's switch.

The reference step is louaaron/Score-Entropy-Discrete-Diffusion at commit 0605786 (the public code of
the paper), re-implemented here from its source (not copied) and run the way that code runs on a CPU:
`REFERENCE_NOTE` below says what matches and what differs, and the benchmark prints it above the table.
Its network takes the reference's state-dict names, and tests/test_bench_step.py checks it against
the output the unmodified reference code produced (tests/fixtures/sedd_reference/model_absorb). Checked
once against the public code itself (run on CPU with the same scaled-dot-product stand-in for flash-attn,
from the same weights and seeds): the same losses, parameters and EMA, bit for bit, over four steps of
each graph.

Rounds are interleaved (reference, eager, compiled, reference, ...) so that load from other
processes hits every variant alike; the table shows medians over the rounds after `--warmup` steps
(the first compiled step includes compilation, reported as compile time: the first compiled step's excess
over the median; the regions compile with dynamic shapes, so a later case reuses graphs an earlier one
built). The machine this runs on may be shared: the timings are indicative, the ratios (measured side by
side) less so. Peak memory is the growth of the process's resident set over one step (VmHWM reset through
/proc/self/clear_refs after returning freed heap memory to the kernel): activations, gradients and
temporaries; the persistent weights and optimizer state are not counted (for sedd-small the three
variants hold about 11 GB of those together).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import chain
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fresh_inductor_cache() -> None:
    """Compile time as a first run sees it: an empty inductor cache for this process (read when compiling)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_step_inductor_")


@dataclass(frozen=True)
class Case:
    """A benchmark row: model dims, graph, micro-batch."""

    name: str
    hidden: int
    heads: int
    blocks: int
    cond: int
    graph: str
    batch: int
    length: int
    num_tokens: int = 50257  # GPT-2

    @property
    def tokens(self) -> int:
        """Tokens per step."""
        return self.batch * self.length


CASES = {c.name: c for c in (
    Case("tiny-absorb", 128, 4, 4, 64, "absorb", 4, 128),
    Case("tiny-uniform", 128, 4, 4, 64, "uniform", 4, 128),
    Case("small-absorb", 768, 12, 12, 128, "absorb", 1, 1024),  # sedd-small
)}

# Our variants: the name sets every compile switch (model.compile, and what the trainer derives from it).
VARIANTS = {"ours eager": False, "ours compiled": True}


# --- the reference step, re-implemented --------------------------------------------------------------
REFERENCE = "louaaron/Score-Entropy-Discrete-Diffusion@0605786"


def reference_label(ddp: bool = True) -> str:
    """The reference step's row name."""
    return "reference step (re-implemented)" + ("" if ddp else ", no DDP")


REFERENCE_NOTE = f"""\
reference step = {REFERENCE} (run_train.py, losses.get_step_fn), re-implemented from its
source and run as that code runs on a CPU (its torch pin is 2.0.1; this is the installed torch).
  same: the DDiT as model/transformer.py writes it (the reference's parameter names; it reproduces the unmodified
    reference's output on tests/fixtures/sedd_reference): nn.Linear layers, LayerNorm in fp32 without bias,
    TimestepEmbedder, EmbeddingLayer, rotary cached per length and applied to the packed qkv, adaLN modulation,
    and the TorchScript functions the reference scripts (modulate_fused, bias_dropout_add_scale_fused_train, the
    rotary fallback taken without flash-attn) under the TorchScript settings its model package sets on import
    (profiling executor off, CPU fusion allowed; with this torch its CPU graphs get no fusion group);
    scale_by_sigma, the scatter of zeros; the whole (B, L, V) log-score tensor; graph_lib's score_entropy as
    written (uniform: ratio = 1 - N/(E + N)); noise_lib's schedules as modules with their dummy parameter;
    losses.get_loss_fn (t, sample_transition, sum over positions, batch mean); the model and the noise wrapped in
    DistributedDataParallel (static_graph, find_unused_parameters) over this process's world of one (gloo), as
    run_train.py wraps them; torch AdamW (lr 3e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0, torch's default
    implementation) over the model's and the noise's parameters, the warmup lr * min(step / 2500, 1) set every
    step, clip_grad_norm_(1.0), model/ema.py's update (0.9999), zero_grad.
  differs: flash_attn_varlen_qkvpacked_func is CUDA-only (and flash-attn does not install without CUDA): its CPU
    stand-in is F.scaled_dot_product_attention (non-causal, no dropout, scale 1/sqrt(D)) on the same packed qkv;
    torch.cuda.amp.autocast(bf16) around the blocks and torch.cuda.amp.GradScaler do nothing on a CPU (so fp32,
    and the scaler's unscale/step/update reduce to optimizer.step()); batches are random tokens (as ours are), no
    data loader, logging, evaluation or checkpointing (on neither side).
ours = Trainer.train_step() with the same optimizer settings (AdamW 3e-4, (0.9, 0.999), 1e-8, no decay, warmup
2500, clip 1.0, EMA 0.9999), DeepSpeed ZeRO-0 in the same world of one."""

# TorchScript settings of the reference's model package (model/fused_add_dropout_scale.py sets them on import).
_REFERENCE_JIT_FLAGS = ((torch._C._jit_set_profiling_mode, False), (torch._C._jit_set_profiling_executor, False),
                        (torch._C._jit_override_can_fuse_on_cpu, True), (torch._C._jit_override_can_fuse_on_gpu, True))


def reference_jit_settings() -> None:
    """Apply the reference's TorchScript settings (process-wide, as importing its model package does; nothing in
    sedd_scale runs TorchScript)."""
    for setter, value in _REFERENCE_JIT_FLAGS:
        setter(value)


def _bias_dropout_add_scale(x: Tensor, bias: Optional[Tensor], scale: Tensor, residual: Optional[Tensor], prob: float,
                            training: bool) -> Tensor:
    """residual + scale * dropout(x + bias)."""
    if bias is not None:
        x = x + bias
    out = scale * F.dropout(x, p=prob, training=training)
    if residual is not None:
        out = residual + out
    return out


@torch.jit.script
def ref_bias_dropout_add_scale_train(x: Tensor, bias: Optional[Tensor], scale: Tensor, residual: Optional[Tensor],
                                     prob: float) -> Tensor:
    """The scripted training variant (dropout on)."""
    return _bias_dropout_add_scale(x, bias, scale, residual, prob, True)


@torch.jit.script
def ref_bias_dropout_add_scale_inference(x: Tensor, bias: Optional[Tensor], scale: Tensor, residual: Optional[Tensor],
                                         prob: float) -> Tensor:
    """The scripted inference variant (dropout off)."""
    return _bias_dropout_add_scale(x, bias, scale, residual, prob, False)


@torch.jit.script
def ref_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift (scripted)."""
    return x * (1 + scale) + shift


def _rotate_half(x: Tensor) -> Tensor:
    """[u1, u2] -> [-u2, u1] on the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.jit.script
def ref_rotary(qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """qkv * cos + rotate_half(qkv) * sin (scripted; the reference's path without flash-attn's rotary kernel)."""
    return qkv * cos + _rotate_half(qkv) * sin


class RefLayerNorm(nn.Module):
    """F.layer_norm in fp32 without weight or bias, then times a weight."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones([dim]))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        """Normalised x times the weight (the reference turns CUDA autocast off here: nothing to do on a CPU)."""
        return F.layer_norm(x.float(), [self.dim]) * self.weight[None, None, :]


class RefRotary(nn.Module):
    """cos/sin tables (1, L, 3, 1, D) for the packed qkv, cached per length; v's rows are 1 and 0."""

    def __init__(self, dim: int, base: float = 10_000):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))
        self.length, self.tables = None, None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The tables for x's length (dim 1)."""
        if x.shape[1] != self.length:
            self.length = x.shape[1]
            angles = torch.outer(torch.arange(self.length, device=x.device).type_as(self.inv_freq), self.inv_freq)
            angles = torch.cat((angles, angles), dim=-1)
            cos = angles.cos()[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
            sin = angles.sin()[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
            cos[:, :, 2].fill_(1.0)
            sin[:, :, 2].fill_(0.0)
            self.tables = (cos, sin)
        return self.tables


class RefTimestepEmbedder(nn.Module):
    """256 sinusoidal features of sigma (cos first) -> Linear -> SiLU -> Linear."""

    def __init__(self, cond: int, features: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(features, cond), nn.SiLU(), nn.Linear(cond, cond))
        self.features = features

    def forward(self, sigma: Tensor) -> Tensor:
        """(B,) -> (B, cond)."""
        half = self.features // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half).to(sigma.device)
        args = sigma[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class RefEmbedding(nn.Module):
    """A free (V, H) matrix, Kaiming-uniform, indexed."""

    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty((vocab, dim)))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        """Rows of x."""
        return self.embedding[x]


class RefBlock(nn.Module):
    """DDiTBlock: adaLN-modulated bidirectional rotary attention, then the GELU-tanh MLP, branches gated."""

    def __init__(self, dim: int, heads: int, cond: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = heads, dropout
        self.norm1 = RefLayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = RefLayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.adaLN_modulation = nn.Linear(cond, 6 * dim)
        self.adaLN_modulation.weight.data.zero_()
        self.adaLN_modulation.bias.data.zero_()

    def forward(self, x: Tensor, cos_sin: tuple[Tensor, Tensor], c: Tensor) -> Tensor:
        """One block."""
        b, length = x.shape[0], x.shape[1]
        branch = ref_bias_dropout_add_scale_train if self.training else ref_bias_dropout_add_scale_inference
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        skip = x
        qkv = self.attn_qkv(ref_modulate(self.norm1(x), shift1, scale1))
        qkv = qkv.view(b, length, 3, self.n_heads, -1)  # 'b s (three h d) -> b s three h d'
        cos, sin = cos_sin
        qkv = ref_rotary(qkv, cos.to(qkv.dtype), sin.to(qkv.dtype))
        # flash_attn_varlen_qkvpacked_func(qkv as (b s) three h d, cu_seqlens, L, 0.0, causal=False) on CUDA;
        # its CPU stand-in: scaled-dot-product attention on the same packed qkv, as (B, heads, L, D) views.
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, length, -1)  # '(b s) h d -> b s (h d)'
        x = branch(self.attn_out(out), None, gate1, skip, self.dropout)
        return branch(self.mlp(ref_modulate(self.norm2(x), shift2, scale2)), None, gate2, x, self.dropout)


class RefFinalLayer(nn.Module):
    """DDitFinalLayer: adaLN-modulated LayerNorm, then Linear(H -> V), all zero-initialised."""

    def __init__(self, dim: int, vocab: int, cond: int):
        super().__init__()
        self.norm_final = RefLayerNorm(dim)
        self.linear = nn.Linear(dim, vocab)
        self.adaLN_modulation = nn.Linear(cond, 2 * dim)
        for layer in (self.linear, self.adaLN_modulation):
            layer.weight.data.zero_()
            layer.bias.data.zero_()

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """(B, L, H) -> (B, L, V)."""
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(ref_modulate(self.norm_final(x), shift, scale))


class RefSEDD(nn.Module):
    """The reference's SEDD network (its module and parameter names); (indices, sigma) -> log-scores (B, L, V)."""

    def __init__(self, hidden: int, heads: int, blocks: int, cond: int, num_tokens: int, graph: str,
                 dropout: float, scale_by_sigma: bool | None = None):
        super().__init__()
        reference_jit_settings()  # what importing the reference's model package does
        self.absorb = graph == "absorb"
        vocab = num_tokens + self.absorb
        self.vocab_embed = RefEmbedding(hidden, vocab)
        self.sigma_map = RefTimestepEmbedder(cond)
        self.rotary_emb = RefRotary(hidden // heads)
        self.blocks = nn.ModuleList(RefBlock(hidden, heads, cond, dropout) for _ in range(blocks))
        self.output_layer = RefFinalLayer(hidden, vocab, cond)
        self.scale_by_sigma = self.absorb if scale_by_sigma is None else scale_by_sigma

    @classmethod
    def for_case(cls, case: Case, dropout: float) -> "RefSEDD":
        """The network of a benchmark case (scale_by_sigma for absorb, as the reference's configs)."""
        return cls(case.hidden, case.heads, case.blocks, case.cond, case.num_tokens, case.graph, dropout)

    def forward(self, indices: Tensor, sigma: Tensor) -> Tensor:
        """Log-scores; the blocks and final layer run under CUDA bf16 autocast in the reference: fp32 on a CPU."""
        x = self.vocab_embed(indices)
        c = F.silu(self.sigma_map(sigma))
        cos_sin = self.rotary_emb(x)
        for block in self.blocks:
            x = block(x, cos_sin, c)
        x = self.output_layer(x, c)
        if self.scale_by_sigma:
            esigm1_log = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log().to(x.dtype)[:, None, None]
            x = x - esigm1_log - math.log(x.shape[-1] - 1)
        return torch.scatter(x, -1, indices[..., None], torch.zeros_like(x[..., :1]))


class RefNoise(nn.Module):
    """noise_lib: log-linear (eps 1e-3; absorb) or geometric (1e-4, 20; uniform); forward(t) -> (total, rate).
    Both hold the reference's dummy parameter `empty` (DDP needs one; it is in the optimizer, never gets a gradient)."""

    def __init__(self, kind: str, eps: float = 1e-3, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.sigmas = 1.0 * torch.tensor([sigma_min, sigma_max])
        self.empty = nn.Parameter(torch.tensor(0.0))

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(total noise, rate) at t."""
        if self.kind == "loglinear":
            return -torch.log1p(-(1 - self.eps) * t), (1 - self.eps) / (1 - (1 - self.eps) * t)
        s0, s1 = self.sigmas
        return s0 ** (1 - t) * s1 ** t, s0 ** (1 - t) * s1 ** t * (s1.log() - s0.log())


def ref_sample_transition(graph: str, dim: int, x0: Tensor, sigma: Tensor) -> Tensor:
    """graph_lib's sample_transition: each token moves with probability 1 - e^-sigma (to MASK, or to a uniform draw)."""
    move = torch.rand(*x0.shape, device=x0.device) < 1 - (-sigma).exp()
    return torch.where(move, dim - 1 if graph == "absorb" else torch.randint_like(x0, dim), x0)


def ref_score_entropy(graph: str, dim: int, score: Tensor, sigma: Tensor, x: Tensor, x0: Tensor) -> Tensor:
    """graph_lib's score_entropy (per token, without the rate), as the reference writes it: `dim` = V."""
    esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), torch.exp(sigma) - 1)
    if graph == "absorb":
        rel = x == dim - 1
        ratio = 1 / esigm1.expand_as(x)[rel]
        neg = ratio * torch.gather(score[rel], -1, x0[rel][..., None]).squeeze(-1)
        pos = score[rel][:, :-1].exp().sum(dim=-1)
        const = ratio * (ratio.log() - 1)
        entropy = torch.zeros(*x.shape, device=x.device)
        entropy[rel] += pos - neg + const
        return entropy
    ratio = 1 - dim / (esigm1 + dim)  # the reference's form (its float32 cancellation included: sedd-math 9.1)
    neg = score.mean(dim=-1) - torch.gather(score, -1, x[..., None]).squeeze(-1) / dim
    neg = torch.where(x == x0, ratio * neg, torch.gather(score, -1, x0[..., None]).squeeze(-1) / esigm1 + neg)
    const = torch.where(x == x0, (dim - 1) / dim * ratio * (ratio.log() - 1),
                        ((-ratio.log() - 1) / ratio - (dim - 2)) / dim)
    sexp = score.exp()
    pos = sexp.mean(dim=-1) - torch.gather(sexp, -1, x[..., None]).squeeze(-1) / dim
    return pos - neg + const


class RefEMA:
    """model/ema.py: shadow -= (1 - d) (shadow - param), d = min(decay, (1 + n) / (10 + n)), over trainable params."""

    def __init__(self, params, decay: float = 0.9999):
        self.shadow = [p.clone().detach() for p in params if p.requires_grad]
        self.decay, self.n = decay, 0

    def update(self, params) -> None:
        """Fold the parameters in."""
        self.n += 1
        one_minus = 1.0 - min(self.decay, (1 + self.n) / (10 + self.n))
        with torch.no_grad():
            for s, p in zip(self.shadow, [p for p in params if p.requires_grad]):
                s.sub_(one_minus * (s - p))


class RefStep:
    """The reference's training step (losses.get_step_fn with accum 1 and optimization_manager) on random tokens.

    `ddp`: wrap the model and the noise in DistributedDataParallel over the default process group (a world of
    one here), as run_train.py does; needs an initialised default group.
    """

    LR, WARMUP, CLIP, ACCUM = 3e-4, 2500, 1.0, 1  # configs/config.yaml (optim, training.accum)
    SAMPLING_EPS = 1e-3  # get_loss_fn's default

    def __init__(self, case: Case, dropout: float, ddp: bool = True):
        self.case = case
        self.dim = case.num_tokens + (case.graph == "absorb")
        model = RefSEDD.for_case(case, dropout)
        noise = RefNoise("loglinear" if case.graph == "absorb" else "geometric")
        if ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, static_graph=True, find_unused_parameters=True)
            noise = DDP(noise, static_graph=True)
        self.model, self.noise = model, noise
        self.ema = RefEMA(model.parameters(), decay=0.9999)
        self.opt = torch.optim.AdamW(chain(model.parameters(), noise.parameters()), lr=self.LR, betas=(0.9, 0.999),
                                     eps=1e-8, weight_decay=0.0)
        self.step = 0
        self.gen = torch.Generator().manual_seed(0)

    def loss(self, x0: Tensor) -> Tensor:
        """get_loss_fn: per-sequence sum over positions of rate * score entropy."""
        t = (1 - self.SAMPLING_EPS) * torch.rand(x0.shape[0], device=x0.device) + self.SAMPLING_EPS
        sigma, dsigma = self.noise(t)
        x_t = ref_sample_transition(self.case.graph, self.dim, x0, sigma[:, None])
        self.model.train()  # model_fn(train=True)
        log_score = self.model(x_t, sigma.reshape(-1))
        loss = ref_score_entropy(self.case.graph, self.dim, log_score, sigma[:, None], x_t, x0)
        return (dsigma[:, None] * loss).sum(dim=-1)

    def __call__(self) -> float:
        """Loss, backward, warmup lr, clip, AdamW, EMA, zero_grad; returns the loss (mean per sequence)."""
        c = self.case
        x0 = torch.randint(0, c.num_tokens, (c.batch, c.length), generator=self.gen)
        loss = self.loss(x0).mean() / self.ACCUM
        loss.backward()  # GradScaler: disabled without CUDA, scale() is the identity
        self.step += 1
        for group in self.opt.param_groups:  # optimize_fn: warmup, then clip (unscale_ is a no-op here)
            group["lr"] = self.LR * min(self.step / self.WARMUP, 1.0)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.CLIP)
        self.opt.step()  # scaler.step(optimizer); scaler.update() does nothing
        self.ema.update(self.model.parameters())
        self.opt.zero_grad()
        return float(loss.detach())


# --- this framework's step ------------------------------------------------------------------------
class RandomTokens:
    """An endless loader of random micro-batches (what the trainer's loader yields)."""

    def __init__(self, case: Case):
        self.case, self.gen = case, torch.Generator().manual_seed(1)

    def __iter__(self):
        while True:
            yield torch.randint(0, self.case.num_tokens, (self.case.batch, self.case.length), generator=self.gen)

    def state_dict(self) -> dict:
        """Nothing to resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to resume."""


def build_trainer(case: Case, dropout: float, run_dir: str, precision: str = "fp32", recompute: bool = False,
                  zero_stage: int = 0, *, compile: bool):
    """A Trainer (world of one) for `case` on random tokens with `model.compile = compile`, the reference's optimizer
    settings (AdamW 3e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, warmup 2500, clip 1.0) and EMA 0.9999.

    The compile switch is set here, before anything is built, because the trainer derives other switches from it
    when it builds (the fused loss's config, the LayerNorm kernel choice): flipping `trainer.model_cfg.compile`
    afterwards flips only the model's regions. `check_compile` says whether a built trainer is what was asked."""
    from sedd_scale.config import Recipe, from_dict
    from sedd_scale.distributed import engine
    from sedd_scale.train.trainer import Trainer

    absorb = case.graph == "absorb"
    recipe = from_dict(Recipe, {
        "model": {"hidden_size": case.hidden, "n_heads": case.heads, "n_blocks": case.blocks, "cond_dim": case.cond,
                  "num_tokens": case.num_tokens, "graph": case.graph, "scale_by_sigma": absorb,
                  "length": case.length, "vocab_multiple": 1, "dropout": dropout, "compile": bool(compile),
                  "precision": precision, "activation_checkpointing": recompute},
        "data": {"manifests": ["unused/manifest.json"], "tokenizer": None, "seq_len": case.length},
        "diffusion": {"noise": "loglinear" if absorb else "geometric"},
        "optim": {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "warmup": 2500,
                  "grad_clip": 1.0},
        "parallel": {"zero_stage": zero_stage, "micro_batch": case.batch, "global_batch": case.batch},
        "train": {"steps": 10**6, "ema": 0.9999},
        "checkpoint": {"dir": run_dir}})
    layout, topology = engine.setup(recipe)
    return Trainer(recipe, layout, topology, loader=RandomTokens(case))


# --- is a variant what its name says? -------------------------------------------------------------------
def compile_flags(trainer) -> list[tuple[str, str, bool]]:
    """Every compile switch a built trainer holds, as (where, holder type, switch): the trainer's model config, and
    every attribute with a boolean `compile` of every module of the engine (the model's and blocks' configs, the
    fused loss's config) and of a pipeline's loss function."""
    flags = [("trainer.model_cfg", type(trainer.model_cfg).__name__, trainer.model_cfg.compile)]
    holders = [(name or "module", m) for name, m in trainer.engine.module.named_modules()]
    loss_fn = getattr(trainer.engine.module, "loss_fn", None)  # a PipelineModule's HeadLoss
    if loss_fn is not None:
        holders.append(("module.loss_fn", loss_fn))
    for name, holder in holders:
        for attr, value in vars(holder).items():
            if not isinstance(value, (nn.Module, Tensor)) and isinstance(getattr(value, "compile", None), bool):
                flags.append((f"{name}.{attr}", type(value).__name__, value.compile))
    return flags


def check_compile(trainer, compiled: bool, variant: str) -> None:
    """Raise AssertionError unless every compile switch of the built trainer is `compiled` and switches of both the
    model (ModelConfig) and the fused loss (HeadLossConfig) were found."""
    flags = compile_flags(trainer)
    wrong = [f"{where} ({kind})" for where, kind, flag in flags if flag != compiled]
    missing = sorted({"ModelConfig", "HeadLossConfig"} - {kind for _, kind, _ in flags})
    if wrong or missing:
        raise AssertionError(f"variant {variant!r} must run with every compile switch {'on' if compiled else 'off'}"
                             + (f"; these are {'off' if compiled else 'on'}: {', '.join(wrong)}" if wrong else "")
                             + (f"; no switch found of {missing} (compile_flags must learn where they are held)"
                                if missing else ""))


@contextlib.contextmanager
def region_calls():
    """Record (region function, compiled switch) of every compiled-region call in the block."""
    from sedd_scale.compiled import Region

    calls: list[tuple[str, bool]] = []
    original = Region.__call__

    def recording(self, compiled, *args):
        calls.append((self.fn.__name__, bool(compiled)))
        return original(self, compiled, *args)

    Region.__call__ = recording
    try:
        yield calls
    finally:
        Region.__call__ = original


def check_regions(calls: list[tuple[str, bool]], compiled: bool | None, variant: str) -> None:
    """Raise AssertionError unless the recorded region calls match the variant: every call with switch `compiled`
    (and at least one call), or none at all for `compiled=None` (a step that is not ours)."""
    if compiled is None:
        if calls:
            raise AssertionError(f"variant {variant!r} ran sedd_scale's compiled regions: {sorted(set(calls))}")
        return
    wrong = sorted({name for name, flag in calls if flag != compiled})
    if not calls or wrong:
        raise AssertionError(f"variant {variant!r} must call every compiled region with compile={compiled}: "
                             + (f"{', '.join(wrong)} called with compile={not compiled}" if wrong
                                else "no region was called"))


def checked_step(step, compiled: bool | None, variant: str):
    """`step`, whose first call records the compiled regions it runs and checks them (`check_regions`)."""
    first = True

    def run():
        nonlocal first
        if not first:
            return step()
        with region_calls() as calls:
            out = step()
        check_regions(calls, compiled, variant)
        first = False
        return out
    return run


# --- measurement ----------------------------------------------------------------------------------
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def measure(step) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of all threads, peak resident growth in bytes) of one call."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    base = _rss_kib("VmRSS") if _LIBC is not None else 0
    start, cpu = time.perf_counter(), time.process_time()
    step()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = (_rss_kib("VmHWM") - base) * 1024 if _LIBC is not None else float("nan")
    return elapsed, cpu, peak


def run_case(case: Case, args) -> list[dict]:
    """Interleaved rounds of every variant; one summary row per variant."""
    from sedd_scale.distributed import parallel

    with contextlib.ExitStack() as stack:
        trainers = {}
        for name, compiled in VARIANTS.items():  # each variant's switches are set from its name, at build time
            trainers[name] = build_trainer(case, args.dropout, stack.enter_context(tempfile.TemporaryDirectory()),
                                           compile=compiled)
            stack.callback(trainers[name].saver.close)
            check_compile(trainers[name], compiled, name)
        torch.manual_seed(0)
        label = reference_label(args.reference_ddp)
        variants = {label: checked_step(RefStep(case, args.dropout, ddp=args.reference_ddp), None, label)}
        variants.update({name: checked_step(trainers[name].train_step, VARIANTS[name], name) for name in VARIANTS})
        times = {k: [] for k in variants}
        cpus = {k: [] for k in variants}
        peaks = {k: [] for k in variants}
        first = {}
        for r in range(args.warmup + args.rounds):
            for name, step in variants.items():
                seconds, cpu, peak = measure(step)
                first.setdefault(name, seconds)
                if r >= args.warmup:
                    times[name].append(seconds)
                    cpus[name].append(cpu)
                    peaks[name].append(peak)
        for name, compiled in VARIANTS.items():  # nothing flipped a switch during the rounds
            check_compile(trainers[name], compiled, name)
    parallel.destroy_parallel()
    rows = []
    ref = {"time": statistics.median(times[label]), "best": min(times[label]), "cpu": statistics.median(cpus[label])}
    for name in variants:
        t, best, cpu = statistics.median(times[name]), min(times[name]), statistics.median(cpus[name])
        rows.append(dict(case=case.name, variant=name, time=t, best=best, cpu=cpu, tokens_per_s=case.tokens / t,
                         peak=max(peaks[name]), ratio=ref["time"] / t, ratio_best=ref["best"] / best,
                         ratio_cpu=ref["cpu"] / cpu, compile=first[name] - t if VARIANTS.get(name) else None))
    return rows


def main() -> None:
    """Parse options, run the cases, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--rounds", type=int, default=None, help="measured rounds (default: 12 tiny, 4 small)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (compilation happens here)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1, help="residual-branch dropout, both sides (paper: 0.1)")
    p.add_argument("--no-reference-ddp", dest="reference_ddp", action="store_false",
                   help="run the reference's model and noise without DistributedDataParallel (run_train.py always "
                        "wraps them; without it: the step as a one-process user calling the reference's modules)")
    p.add_argument("--warm-cache", action="store_true",
                   help="reuse the user's inductor cache (default: an empty one, so compile time is a first run's)")
    args = p.parse_args()
    if not args.warm_cache:
        fresh_inductor_cache()
    torch.set_num_threads(args.threads)
    print(REFERENCE_NOTE)
    if not args.reference_ddp:
        print("--no-reference-ddp: the reference's model and noise run unwrapped (no DistributedDataParallel)")
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, dropout {args.dropout}; step = median wall time "
          f"over interleaved rounds (best = fastest round, CPU = median CPU time of all threads, which a loaded "
          f"machine inflates less); 'vs reference step' = the reference step's time over the variant's; indicative "
          f"timings (the machine may be shared)", flush=True)
    print("| case | tokens/step | variant | step (s) | tokens/s | vs reference step | best (s) | vs ref (best) | "
          "CPU (s) | vs ref (CPU) | peak step RSS (MiB) | compile (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.cases:
        case = CASES[name]
        rounds = args.rounds or (4 if case.name.startswith("small") else 12)
        for row in run_case(case, argparse.Namespace(**{**vars(args), "rounds": rounds})):
            comp = "" if row["compile"] is None else f"{max(row['compile'], 0.0):.1f}"
            print(f"| {row['case']} | {case.tokens} | {row['variant']} | {row['time']:.3f} | "
                  f"{row['tokens_per_s']:.0f} | {row['ratio']:.2f}x | {row['best']:.3f} | {row['ratio_best']:.2f}x | "
                  f"{row['cpu']:.2f} | {row['ratio_cpu']:.2f}x | {row['peak'] / 2**20:.0f} | {comp} |", flush=True)


if __name__ == "__main__":
    main()
