"""The SEDD network (sedd-math section 4) from megatron-core tensor-parallel layers.

A DiT-style bidirectional transformer conditioned on the total noise sigma through adaLN
modulation. It is a sequence of stage-able layers, so a pipeline engine can cut it anywhere:

    InputLayer  (indices, sigma)  -> (h, c)      token embedding + noise-level embedding
    Block x N   (h, c)            -> (h, c)      adaLN-modulated attention + MLP
    OutputLayer (h, c)            -> raw         final norm + modulation, vocab-parallel head

`SEDD` composes them for a single stage and post-processes with `to_log_score`.

Tensor parallelism (megatron-core, no sequence parallelism): the token embedding and the head
are split over the padded vocabulary, qkv and MLP-in are column-parallel (qkv by heads),
attention-out and MLP-out row-parallel. Log-scores leave the model vocab-sharded: rank r holds
columns [r * V_pad / tp, (r + 1) * V_pad / tp). The noise embedding, the adaLN layers and the
norms are small and replicated; their inputs and output gradients are identical on all TP
ranks (the column-parallel layers all-reduce their input gradients), so their gradients agree
without extra communication. The residual-branch dropout acts on replicated activations and
draws from the default RNG (equal across TP ranks, see `sedd_scale.distributed.parallel.seed_parallel`); attention
dropout acts on head shards and draws from megatron's per-TP-rank tracker.

Layout is (batch, length, hidden) like the reference.

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

LN_EPS = 1e-5


def _uniform_init(fan_in: int):
    # nn.Linear's (and the reference embedding's) kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)),
    # with fan_in of the full matrix, so shard-wise GPU initialisation draws from the same law.
    bound = 1.0 / math.sqrt(fan_in)
    return lambda w: nn.init.uniform_(w, -bound, bound)


def megatron_config(cfg: ModelConfig, device: torch.device) -> ModelParallelConfig:
    """megatron-core layer settings for this model on `device` (CPU-safe: no fusions, no sequence parallel)."""
    return ModelParallelConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        params_dtype=cfg.params_dtype,
        # Off CUDA (CPU, meta), each full matrix is built from the default RNG and sliced.
        use_cpu_initialization=device.type != "cuda",
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
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


def _rotary_heads(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """qkv (B, L, 3, heads, D) -> rotated q, k and v, each (B, heads, L, D)."""
    q, k, v = qkv.unbind(2)
    with torch.autocast(qkv.device.type, enabled=False):  # the reference rotates in qkv's dtype
        q, k = rotary.apply_rotary(q, cos, sin), rotary.apply_rotary(k, cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _gate_residual(x: Tensor, gate: Tensor, branch: Tensor) -> Tensor:
    """x + gate * branch."""
    return x + gate * branch


NORM_MODULATE, ROTARY_HEADS, GATE_RESIDUAL = Region(_norm_modulate), Region(_rotary_heads), Region(_gate_residual)


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 even under autocast (the reference's), and the
    adaLN modulation that always follows it (one region, so a compiled model fuses them)."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.dim, self.config = dim, cfg
        # apex's fused kernel on CUDA where importable and the blocks are eager (logged once per process).
        self.kernels = accelerators.choose(cuda=torch.device(device).type == "cuda", compiled=cfg.compile)

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        """float32 normalised x times the weight, modulated: * (1 + scale) + shift."""
        if self.kernels.layer_norm == "apex":
            with torch.autocast(x.device.type, enabled=False):
                y = accelerators.layer_norm(x, self.weight, LN_EPS, self.kernels)
            return modulate(y, shift, scale)
        return NORM_MODULATE(self.config.compile, x, self.weight, shift, scale)


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


class InputLayer(nn.Module):
    """(indices (B, L), total noise (B,)) -> (hidden (B, L, H), conditioning c (B, C))."""

    def __init__(self, cfg: ModelConfig, mcfg: ModelParallelConfig, device: torch.device):
        super().__init__()
        self.config = cfg
        self.vocab_embed = tensor_parallel.VocabParallelEmbedding(
            cfg.padded_vocab(ps.get_tensor_model_parallel_world_size()), cfg.hidden_size,
            init_method=_uniform_init(cfg.hidden_size),
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
        return self.vocab_embed(indices), F.silu(self.sigma_map(total_noise))


class Block(nn.Module):
    """DDiT block: (h, c) -> (h, c); adaLN-modulated bidirectional rotary attention, then GELU-tanh MLP."""

    def __init__(self, cfg: ModelConfig, mcfg: ModelParallelConfig, device: torch.device):
        super().__init__()
        self.config = cfg
        h, tp = cfg.hidden_size, ps.get_tensor_model_parallel_world_size()
        cfg.check_tp(tp)
        if cfg.compile:
            check_compiler(device)
        self.local_heads = cfg.n_heads // tp
        ffn = cfg.mlp_ratio * h
        self.norm1 = LayerNorm(h, cfg.params_dtype, device, cfg)
        # Local output is [q | k | v] of this rank's heads (hub.py permutes the reference's [q | k | v] rows).
        self.attn_qkv = tensor_parallel.ColumnParallelLinear(
            h, 3 * h, config=mcfg, init_method=_uniform_init(h), bias=False, gather_output=False)
        self.attn_out = tensor_parallel.RowParallelLinear(
            h, h, config=mcfg, init_method=_uniform_init(h), bias=False, input_is_parallel=True,
            skip_bias_add=False)
        self.norm2 = LayerNorm(h, cfg.params_dtype, device, cfg)
        self.mlp_in = tensor_parallel.ColumnParallelLinear(
            h, ffn, config=mcfg, init_method=_uniform_init(h), bias=True, gather_output=False)
        self.mlp_out = tensor_parallel.RowParallelLinear(
            ffn, h, config=mcfg, init_method=_uniform_init(ffn), bias=True, input_is_parallel=True,
            skip_bias_add=False)
        self.adaLN_modulation = _linear(cfg, cfg.cond_dim, 6 * h, device, zero=True)

    def _branch_out(self, x: Tensor, gate: Tensor, branch: Tensor) -> Tensor:
        # The reference's bias_dropout_add_scale: x + gate * dropout(branch), on replicated activations.
        if self.training and self.config.dropout > 0:
            branch = F.dropout(branch, p=self.config.dropout)
        return GATE_RESIDUAL(self.config.compile, x, gate, branch)

    def _attention(self, h: Tensor) -> Tensor:
        cfg = self.config
        b, length, _ = h.shape
        qkv, _ = self.attn_qkv(h.to(self.attn_qkv.weight.dtype))
        cos, sin = rotary.cos_sin(length, cfg.head_dim, cfg.rotary_base, h.device)
        qkv = qkv.view(b, length, 3, self.local_heads, cfg.head_dim)
        q, k, v = ROTARY_HEADS(cfg.compile, qkv, cos, sin)  # (B, heads, L, D)
        p = cfg.attention_dropout if self.training else 0.0
        # Head shards are TP-local: their dropout draws from the per-TP-rank tracker stream.
        with tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 else contextlib.nullcontext():
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=False)
        out, _ = self.attn_out(o.transpose(1, 2).reshape(b, length, self.local_heads * cfg.head_dim))
        return out

    def _mlp(self, h: Tensor) -> Tensor:
        u, _ = self.mlp_in(h.to(self.mlp_in.weight.dtype))
        out, _ = self.mlp_out(F.gelu(u, approximate="tanh"))
        return out

    def _forward(self, x: Tensor, c: Tensor) -> Tensor:
        with _autocast(self.config, x):
            # Contiguous (B, 1, H) pieces: offsets into one buffer would each specialise a compiled region.
            mod = [m.contiguous() for m in self.adaLN_modulation(c)[:, None].chunk(6, dim=2)]
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
        self.config = cfg
        h, tp = cfg.hidden_size, ps.get_tensor_model_parallel_world_size()
        self.padded_vocab = cfg.padded_vocab(tp)
        self.vocab_start = ps.get_tensor_model_parallel_rank() * (self.padded_vocab // tp)
        self.norm_final = LayerNorm(h, cfg.params_dtype, device, cfg)
        self.adaLN_modulation = _linear(cfg, cfg.cond_dim, 2 * h, device, zero=True)
        self.linear = tensor_parallel.ColumnParallelLinear(
            h, self.padded_vocab, config=mcfg, init_method=nn.init.zeros_, bias=True, gather_output=False)

    def features(self, x: Tensor, c: Tensor) -> Tensor:
        """The modulated hidden state the head projects (what a fused vocab-parallel loss consumes)."""
        with _autocast(self.config, x):
            shift, scale = (m.contiguous() for m in self.adaLN_modulation(c)[:, None].chunk(2, dim=2))
            return self.norm_final(x, shift, scale).to(self.linear.weight.dtype)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """Raw head output for this rank's vocabulary shard."""
        with _autocast(self.config, x):
            out, _ = self.linear(self.features(x, c))
        return out

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
    `torch.cuda.current_device()`).
    """

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None):
        super().__init__()
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        mcfg = megatron_config(config, device)
        self.config = config
        self.input_layer = InputLayer(config, mcfg, device)
        self.blocks = nn.ModuleList(Block(config, mcfg, device) for _ in range(config.n_blocks))
        self.output_layer = OutputLayer(config, mcfg, device)

    @property
    def vocab_start(self) -> int:
        """First global vocabulary index of this rank's output shard."""
        return self.output_layer.vocab_start

    def hidden(self, indices: Tensor, total_noise: Tensor) -> tuple[Tensor, Tensor]:
        """(h, c) after the last block (input of the output layer)."""
        x, c = self.input_layer(indices, total_noise)
        for block in self.blocks:
            x, c = block(x, c)
        return x, c

    def forward(self, indices: Tensor, total_noise: Tensor) -> Tensor:
        """Log-scores log s(x)_y for this rank's vocabulary shard, (B, L, V_pad / tp), float32 or wider."""
        x, c = self.hidden(indices, total_noise)
        return self.output_layer.log_score(self.output_layer(x, c), indices, total_noise)
