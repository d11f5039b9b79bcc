"""Packing as in the SEDD paper: documents (each followed by EOS) concatenated and cut into
fixed-length sequences.

Sequences run across document boundaries; nothing is padded. Remainder policy (the reference's
`group_texts`): the split's last tokens that do not fill a whole sequence are dropped, once per
split, and counted in the manifest (`dropped_tokens` < seq_len).
"""
from __future__ import annotations

import numpy as np


class Packer:
    """Turns a stream of token arrays into (n, seq_len) sequences."""

    def __init__(self, seq_len: int, dtype: np.dtype):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len, self.dtype = seq_len, dtype
        self._tail = np.empty(0, dtype=dtype)
        self.num_sequences = 0

    def add(self, tokens: np.ndarray) -> np.ndarray:
        """Append tokens; return the whole sequences completed by them, shape (n, seq_len)."""
        buf = np.concatenate([self._tail, tokens.astype(self.dtype, copy=False)])
        n = len(buf) // self.seq_len
        self._tail = buf[n * self.seq_len:].copy()
        self.num_sequences += n
        return buf[:n * self.seq_len].reshape(n, self.seq_len)

    def finish(self) -> int:
        """End the split: drop the incomplete tail; return how many tokens were dropped."""
        dropped, self._tail = len(self._tail), self._tail[:0]
        return dropped
