"""The SEDD network (sedd-math section 4) from megatron-core tensor-parallel layers.

A DiT-style bidirectional transformer conditioned on the total noise sigma through adaLN
modulation. It is a sequence of stage-able layers, so a pipeline engine can cut it anywhere:

    InputLayer  (indices, sigma)  -> (h, c)      token embedding + noise-level embedding
    Block x N   (h, c)            -> (h, c)      adaLN-modulated attention + MLP
    OutputLayer (h, c)            -> raw         final norm + modulation, vocab-parallel head

`SEDD` composes them for a single stage and post-processes with `to_log_score`.

Tensor parallelism (megatron-core): the token embedding and the head
are split over the padded vocabulary, qkv and MLP-in are column-parallel (qkv by heads),
attention-out and MLP-out row-parallel. Log-scores leave the model vocab-sharded: rank r holds
columns [r * V_pad / tp, (r + 1) * V_pad / tp). The noise embedding, the adaLN layers and the
norms are small and replicated; their inputs and output gradients are identical on all TP
ranks (the column-parallel layers all-reduce their input gradients), so their gradients agree
without extra communication. The residual-branch dropout acts on replicated activations and
draws from the default RNG (equal across TP ranks, see `sedd_scale.distributed.parallel.seed_parallel`); attention
dropout acts on head shards and draws from megatron's per-TP-rank tracker.

Inside, the network runs sequence-first: the hidden state between layers is (length, batch, hidden), which
megatron-core's sequence-parallel regions and DeepSpeed-Ulysses split along the first dimension; its inputs and
outputs are batch-first like the reference's. Sequence parallelism (`sequence_parallel=True`) and context
parallelism (megatron-core's CP group, `parallel.context_parallel`) are in `sedd_scale.model.sequence`.

Regional compilation (`model.compile`): the block's elementwise work between its GEMMs and attention
(fp32 LayerNorm, weight and adaLN modulation; rotary on q and k with the head transposes; gate and
residual) is written as pure tensor functions (`sedd_scale.compiled.Region`), run eagerly or fused by
torch.compile. The megatron-core linears (autograd functions whose backward all-reduces over TP),
DeepSpeed's ZeRO-3 parameter hooks (they gather a module's weights in its forward) and dropout (eager
RNG) stay outside the compiled graphs, so the switch composes with TP, PP, activation checkpointing
and ZeRO 0-3 without graph breaks, and one compiled graph serves every block.
"""
from __future__ import annotations

import contextlib
import math

import sedd_scale.compat  # noqa: F401  (before megatron.core)

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import Tensor, nn

from sedd_scale import accelerators
from sedd_scale.compiled import Region, check_compiler
from sedd_scale.diffusion.parametrization import to_log_score
from sedd_scale.model import rotary
from sedd_scale.model.config import SIGMA_FEATURES, ModelConfig
from sedd_scale.model.sequence import SequenceSplit, ulysses

LN_EPS = 1e-5


def _uniform_init(fan_in: int):
    # nn.Linear's (and the reference embedding's) kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)),
    # with fan_in of the full matrix, so shard-wise GPU initialisation draws from the same law.
    bound = 1.0 / math.sqrt(fan_in)
    return lambda w: nn.init.uniform_(w, -bound, bound)


def megatron_config(cfg: ModelConfig, device: torch.device, sequence_parallel: bool = False) -> ModelParallelConfig:
    """megatron-core layer settings for this model on `device` (CPU-safe: no fusions)."""
    return ModelParallelConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        params_dtype=cfg.params_dtype,
        # Off CUDA (CPU, meta), each full matrix is built from the default RNG and sliced.
        use_cpu_initialization=device.type != "cuda",
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        sequence_parallel=sequence_parallel,
    )


def _autocast(cfg: ModelConfig, x: Tensor):
    # No context at all (not autocast(enabled=False)) when off, so a caller's autocast still applies.
    if cfg.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, dtype=cfg.autocast_dtype)


def _norm_modulate(x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: LayerNorm(x) * weight * (1 + scale) + shift, the norm in float32 even under autocast."""
    with torch.autocast(x.device.type, enabled=False):
        y = F.layer_norm(x.float(), [x.shape[-1]], eps=LN_EPS) * weight
    return modulate(y, shift, scale)


def _rotary_heads(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sequence-first q, k, v (L, B, heads, D) -> rotated q, k and v, each (B, heads, L, D)."""
    with torch.autocast(q.device.type, enabled=False):  # the reference rotates in qkv's dtype
        q, k = rotary.apply_rotary(q, cos, sin), rotary.apply_rotary(k, cos, sin)
    return q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)


def _gate_residual(x: Tensor, gate: Tensor, branch: Tensor) -> Tensor:
    """x + gate * branch."""
    return x + gate * branch


NORM_MODULATE, ROTARY_HEADS, GATE_RESIDUAL = Region(_norm_modulate), Region(_rotary_heads), Region(_gate_residual)


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 even under autocast (the reference's), and the
    adaLN modulation that always follows it (one region, so a compiled model fuses them)."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, cfg: ModelConfig,
                 split: SequenceSplit | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.dim, self.config, self.split = dim, cfg, split or SequenceSplit()  # default: the whole sequence
        # apex's fused kernel on CUDA where importable and the blocks are eager (logged once per process).
        self.kernels = accelerators.choose(cuda=torch.device(device).type == "cuda", compiled=cfg.compile)

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        """float32 normalised x times the weight, modulated: * (1 + scale) + shift."""
        weight = self.split.tp_summed(self.weight)
        if self.kernels.layer_norm == "apex":
            with torch.autocast(x.device.type, enabled=False):
                y = accelerators.layer_norm(x, weight, LN_EPS, self.kernels)
            return modulate(y, shift, scale)
        return NORM_MODULATE(self.config.compile, x, weight, shift, scale)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


def _linear(cfg: ModelConfig, fan_in: int, fan_out: int, device: torch.device, zero: bool) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out, dtype=cfg.params_dtype, device=device)
    if zero:  # adaLN-zero: every modulation starts as the identity with closed gates
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return layer


class SigmaMap(nn.Module):
    """Noise-level embedding: sinusoidal features of sigma -> Linear -> SiLU -> Linear (TimestepEmbedder)."""

    def __init__(self, cfg: ModelConfig, device: torch.device):
        super().__init__()
        c = cfg.cond_dim
        self.mlp = nn.Sequential(_linear(cfg, SIGMA_FEATURES, c, device, False), nn.SiLU(),
                                 _linear(cfg, c, c, device, False))

    def forward(self, sigma: Tensor) -> Tensor:
        """(B,) total noise -> (B, cond_dim), before the final SiLU."""
        half = SIGMA_FEATURES // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma[:, None].float() * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def _modulation(layer: nn.Linear, c: Tensor, n: int, split: SequenceSplit) -> list[Tensor]:
    """adaLN: c (B, C) -> n contiguous (1, B, H) shifts, scales and gates for sequence-first activations."""
    # Contiguous pieces: offsets into one buffer would each specialise a compiled region.
    return [m.contiguous() for m in split.tp_summed(layer(c))[None].chunk(n, dim=2)]


class InputLayer(nn.Module):
    """(indices (B, L), total noise (B,)) -> (hidden (L_local, B, H), conditioning c (B, C)).

    L_local: this rank's CP chunk of the positions, and its TP share of those under sequence parallelism."""

    def __init__(self, cfg: ModelConfig, mcfg: ModelParallelConfig, device: torch.device):
        super().__init__()
        self.config, self.split = cfg, SequenceSplit.current(mcfg.sequence_parallel)
        self.vocab_embed = tensor_parallel.VocabParallelEmbedding(
            cfg.padded_vocab(ps.get_tensor_model_parallel_world_size()), cfg.hidden_size,
            init_method=_uniform_init(cfg.hidden_size), reduce_scatter_embeddings=mcfg.sequence_parallel,
            config=mcfg)
        self.sigma_map = SigmaMap(cfg, device)

    def forward(self, indices: Tensor, total_noise: Tensor) -> tuple[Tensor, Tensor]:
        """Embed tokens (no positional table: rotary acts in attention) and the noise level."""
        if indices.dim() != 2 or indices.dtype != torch.int64:
            raise ValueError(f"indices must be an int64 (batch, length) tensor, got {indices.dtype} "
                             f"{tuple(indices.shape)} (use .long())")
        if total_noise.shape != indices.shape[:1]:
            raise ValueError(f"total_noise must have shape (batch,) = {tuple(indices.shape[:1])}, "
                             f"got {tuple(total_noise.shape)}")
        x = self.vocab_embed(self.split.local(indices))  # SP: reduce-scattered to (L_local, B, H) already
        if not self.split.sequence_parallel:
            x = x.transpose(0, 1).contiguous()
        return x, F.silu(self.sigma_map(total_noise))


class Attention(nn.Module):
    """Bidirectional rotary attention of sequence-first q, k, v (L, B, heads, D) over the whole sequence."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The attention output (L, B, heads, D), rotary positions 0..L-1."""
        cfg = self.config
        cos, sin = rotary.cos_sin(q.shape[0], cfg.head_dim, cfg.rotary_base, q.device)
        q, k, v = ROTARY_HEADS(cfg.compile, q, k, v, cos[:, None], sin[:, None])  # (B, heads, L, D)
        p = cfg.attention_dropout if self.training else 0.0
        # Head shards are TP-local: their dropout draws from the per-TP-rank tracker stream.
        with tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 else contextlib.nullcontext():
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=False)
        return o.permute(2, 0, 1, 3)


class Block(nn.Module):
    """DDiT block: (h, c) -> (h, c); adaLN-modulated bidirectional rotary attention, then GELU-tanh MLP."""

    def __init__(self, cfg: ModelConfig, mcfg: ModelParallelConfig, device: torch.device):
        super().__init__()
        self.config, self.split = cfg, SequenceSplit.current(mcfg.sequence_parallel)
        h, tp = cfg.hidden_size, ps.get_tensor_model_parallel_world_size()
        cfg.check_tp(tp)
        if (cfg.n_heads // tp) % self.split.cp:
            raise ValueError(f"context parallelism trades sequence chunks for heads: the {cfg.n_heads // tp} heads of "
                             f"a TP rank (n_heads={cfg.n_heads} / tp={tp}) do not split over context_parallel="
                             f"{self.split.cp}: choose tp x context_parallel dividing n_heads")
        if cfg.compile:
            check_compiler(device)
        self.local_heads = cfg.n_heads // tp
        ffn = cfg.mlp_ratio * h
        self.norm1 = LayerNorm(h, cfg.params_dtype, device, cfg, self.split)
        # Local output is [q | k | v] of this rank's heads (hub.py permutes the reference's [q | k | v] rows).
        self.attn_qkv = tensor_parallel.ColumnParallelLinear(
            h, 3 * h, config=mcfg, init_method=_uniform_init(h), bias=False, gather_output=False)
        self.attn_out = tensor_parallel.RowParallelLinear(
            h, h, config=mcfg, init_method=_uniform_init(h), bias=False, input_is_parallel=True,
            skip_bias_add=False)
        self.norm2 = LayerNorm(h, cfg.params_dtype, device, cfg, self.split)
        self.mlp_in = tensor_parallel.ColumnParallelLinear(
            h, ffn, config=mcfg, init_method=_uniform_init(h), bias=True, gather_output=False)
        # The bias is added here, not inside (skip_bias_add): under SP it acts on a sequence shard (`tp_summed`).
        self.mlp_out = tensor_parallel.RowParallelLinear(
            ffn, h, config=mcfg, init_method=_uniform_init(ffn), bias=True, input_is_parallel=True,
            skip_bias_add=True)
        self.adaLN_modulation = _linear(cfg, cfg.cond_dim, 6 * h, device, zero=True)
        self.attention = Attention(cfg)
        self.ulysses = ulysses(self.attention, self.split)  # CP > 1: all-to-alls around the attention

    def _branch_out(self, x: Tensor, gate: Tensor, branch: Tensor) -> Tensor:
        # The reference's bias_dropout_add_scale: x + gate * dropout(branch), on replicated activations (SP: on
        # this rank's sequence shard).
        if self.training and self.config.dropout > 0:
            with self.split.dropout_rng():
                branch = F.dropout(branch, p=self.config.dropout)
        return GATE_RESIDUAL(self.config.compile, x, gate, branch)

    def _attention(self, h: Tensor) -> Tensor:
        cfg = self.config
        qkv, _ = self.attn_qkv(h.to(self.attn_qkv.weight.dtype))  # (L, B, 3 * local heads * D); SP: gathered
        length, b = qkv.shape[:2]
        q, k, v = qkv.view(length, b, 3, self.local_heads, cfg.head_dim).unbind(2)
        o = self.attention(q, k, v) if self.ulysses is None else self.ulysses(q, k, v, 1)  # 1: the batch dim
        out, _ = self.attn_out(o.reshape(length, b, self.local_heads * cfg.head_dim))
        return out

    def _mlp(self, h: Tensor) -> Tensor:
        u, _ = self.mlp_in(h.to(self.mlp_in.weight.dtype))
        out, bias = self.mlp_out(F.gelu(u, approximate="tanh"))
        return out + self.split.tp_summed(bias)

    def _forward(self, x: Tensor, c: Tensor) -> Tensor:
        with _autocast(self.config, x):
            mod = _modulation(self.adaLN_modulation, c, 6, self.split)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
            x = self._branch_out(x, gate_msa, self._attention(self.norm1(x, shift_msa, scale_msa)))
            return self._branch_out(x, gate_mlp, self._mlp(self.norm2(x, shift_mlp, scale_mlp)))

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One block; recomputed in backward when activation checkpointing is on."""
        if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
            # megatron's checkpoint restores the default and tracker RNG states, so recomputed dropout
            # masks are the forward's.
            return tensor_parallel.checkpoint(self._forward, False, x, c), c
        return self._forward(x, c), c


class OutputLayer(nn.Module):
    """(h, c) -> raw vocab-sharded output (B, L, V_pad / tp): final norm, adaLN modulation, head."""

    def __init__(self, cfg: ModelConfig, mcfg: ModelParallelConfig, device: torch.device):
        super().__init__()
        self.config, self.split = cfg, SequenceSplit.current(mcfg.sequence_parallel)
        h, tp = cfg.hidden_size, ps.get_tensor_model_parallel_world_size()
        self.padded_vocab = cfg.padded_vocab(tp)
        self.vocab_start = ps.get_tensor_model_parallel_rank() * (self.padded_vocab // tp)
        self.norm_final = LayerNorm(h, cfg.params_dtype, device, cfg, self.split)
        self.adaLN_modulation = _linear(cfg, cfg.cond_dim, 2 * h, device, zero=True)
        self.linear = tensor_parallel.ColumnParallelLinear(
            h, self.padded_vocab, config=mcfg, init_method=nn.init.zeros_, bias=True, gather_output=False)

    def features(self, x: Tensor, c: Tensor) -> Tensor:
        """The modulated hidden state the head projects, sequence-first and split like x (what a fused
        vocab-parallel loss consumes: `sedd_scale.distributed.pipeline.head_loss`)."""
        with _autocast(self.config, x):
            shift, scale = _modulation(self.adaLN_modulation, c, 2, self.split)
            return self.norm_final(x, shift, scale).to(self.linear.weight.dtype)

    def raw(self, features: Tensor) -> Tensor:
        """`features` -> raw head output (B, L, V_pad / tp) of this rank's vocabulary shard over whole sequences
        (SP: the column-parallel head gathers the shards; CP: the chunks are gathered)."""
        with _autocast(self.config, features):
            out, _ = self.linear(features)
        return self.split.gather_cp(out).transpose(0, 1)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """Raw head output for this rank's vocabulary shard, (B, L, V_pad / tp)."""
        return self.raw(self.features(x, c))

    def log_score(self, raw: Tensor, indices: Tensor, total_noise: Tensor) -> Tensor:
        """Raw output -> log-scores of this shard (absorb shift or the denoiser's softmax, 0 at the current token,
        padding -inf); for a denoiser a collective over the TP group (its normalizer spans the shards)."""
        cfg = self.config
        group = None
        if cfg.parametrization == "denoiser" and ps.get_tensor_model_parallel_world_size() > 1:
            group = ps.get_tensor_model_parallel_group()
        return to_log_score(raw, indices, total_noise, num_tokens=cfg.num_tokens, graph_dim=cfg.vocab_size,
                            scale_by_sigma=cfg.scale_by_sigma, vocab_start=self.vocab_start,
                            parametrization=cfg.parametrization, group=group)


class SEDD(nn.Module):
    """The whole network on one pipeline stage: (indices, total noise) -> vocab-sharded log-scores.

    Needs megatron's parallel groups (`sedd_scale.distributed.parallel.init_model_parallel`); seed it first
    (`init_model_parallel(..., seed=s)`) so replicated weights agree across TP ranks. Parameters are
    created on `device` (default: CUDA when available; the TP layers on CUDA land on
    `torch.cuda.current_device()`). `sequence_parallel`: megatron-core's sequence parallelism (TP > 1); context
    parallelism follows megatron-core's CP group (`sedd_scale.model.sequence`).
    """

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None, *,
                 sequence_parallel: bool = False):
        super().__init__()
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        mcfg = megatron_config(config, device, sequence_parallel)
        self.config = config
        self.input_layer = InputLayer(config, mcfg, device)
        self.blocks = nn.ModuleList(Block(config, mcfg, device) for _ in range(config.n_blocks))
        self.output_layer = OutputLayer(config, mcfg, device)

    @property
    def vocab_start(self) -> int:
        """First global vocabulary index of this rank's output shard."""
        return self.output_layer.vocab_start

    def hidden(self, indices: Tensor, total_noise: Tensor) -> tuple[Tensor, Tensor]:
        """(h, c) after the last block (input of the output layer); h is sequence-first, this rank's share."""
        x, c = self.input_layer(indices, total_noise)
        for block in self.blocks:
            x, c = block(x, c)
        return x, c

    def forward(self, indices: Tensor, total_noise: Tensor) -> Tensor:
        """Log-scores log s(x)_y for this rank's vocabulary shard, (B, L, V_pad / tp), float32 or wider."""
        x, c = self.hidden(indices, total_noise)
        return self.output_layer.log_score(self.output_layer(x, c), indices, total_noise)
