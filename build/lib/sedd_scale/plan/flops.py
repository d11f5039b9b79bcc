"""Model FLOPs per trained token (what MFU is measured against) and the share of positions the head projects."""
from __future__ import annotations

from typing import TYPE_CHECKING

from sedd_scale.diffusion.noise import masked_fraction
from sedd_scale.model.config import SIGMA_FEATURES, ModelConfig

if TYPE_CHECKING:
    from sedd_scale.config import Recipe


def training_flops_per_token(cfg: ModelConfig, seq_len: int, head_fraction: float = 1.0) -> float:
    """Model FLOPs of one training step per token: the matmuls it does, forward and backward.

    Convention (what MFU is measured against):
    * every GEMM counts 2 m n k, forward and again for each of its two backward products (input and
      weight gradient): 3x its forward, except the noise embedding's first layer, whose input (sinusoids
      of sigma) needs no gradient: 2x;
    * attention counts its two batched products, scores Q K^T and the weighted sum of V (4 L H per token
      forward, bidirectional: the whole L x L), times 3;
    * the head counts only the rows the fused loss projects (real tokens, no MASK or vocabulary padding
      columns): every position for the uniform graph, the masked ones for the absorbing graph, whose
      expected share is `head_fraction` (`projected_fraction`);
    * not counted: the input-embedding lookup (a gather, no multiply), elementwise work, softmax, and the
      forward recomputation of activation checkpointing (hardware FLOPs, not model FLOPs).
    Per-sequence work (adaLN and noise-embedding GEMMs) is divided by `seq_len`.
    """
    h, c, f, n = cfg.hidden_size, cfg.cond_dim, cfg.mlp_ratio * cfg.hidden_size, cfg.num_tokens
    per_token = 2 * h * 3 * h + 2 * h * h + 2 * 2 * h * f + 4 * seq_len * h  # qkv, out, MLP in + out, attention
    per_sequence = 2 * c * 6 * h  # the block's adaLN modulation
    block = 3 * (per_token + per_sequence / seq_len)
    sigma_map = (2 * 2 * SIGMA_FEATURES * c + 3 * 2 * c * c) / seq_len
    final = 3 * 2 * c * 2 * h / seq_len
    head = 3 * 2 * h * n * head_fraction
    return cfg.n_blocks * block + sigma_map + final + head


def projected_fraction(recipe: "Recipe") -> float:
    """Expected fraction of tokens the loss projects: the masked ones for absorb (t ~ U[sampling_eps, 1], any
    schedule: `diffusion.noise.masked_fraction`), all of them for uniform."""
    if recipe.model.graph != "absorb":
        return 1.0
    return masked_fraction(recipe.diffusion.schedule(), recipe.diffusion.sampling_eps)
