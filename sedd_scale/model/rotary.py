"""Rotary position embedding, "rotate-half" convention (the reference's model/rotary.py)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor


def inv_freq(head_dim: int, base: float) -> Tensor:
    """Frequencies 1 / base^(2k/D), k < D/2, in float32 exactly as the reference computes them."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


@functools.lru_cache(maxsize=16)
def cos_sin(seq_len: int, head_dim: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """float32 (L, 1, D) cos and sin of position * inv_freq, the half-length angles duplicated."""
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq(head_dim, base))
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :].to(device)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    """[u1, u2] -> [-u2, u1] over the last dim's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys (..., D) by cos/sin broadcast against them (positions on the sequence dim); cos/sin are
    cast to x's dtype like the reference."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)
