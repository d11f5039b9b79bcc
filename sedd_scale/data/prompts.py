"""Prompt/response (SFT) rows: a conditional manifest stores each sequence's prompt length after its tokens
(`Manifest.conditional`); here a batch of such rows becomes its tokens and the mask of its prompt positions, the
positions that training and evaluation hold clean (never noised, never scored)."""
from __future__ import annotations

import torch
from torch import Tensor


def split_prompts(rows: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """(tokens (B, seq_len), given (B, seq_len) bool: True on each row's prompt) of stored rows (B, seq_len + 1)."""
    if rows.dim() != 2 or rows.shape[1] != seq_len + 1:
        raise ValueError(f"conditional rows must be (B, seq_len + 1 = {seq_len + 1}), got {tuple(rows.shape)}")
    tokens, lengths = rows[:, :seq_len], rows[:, seq_len]
    return tokens, torch.arange(seq_len, device=rows.device) < lengths[:, None]
