"""The fixed byte layout of a token shard: where every sequence's bytes lie, computed, never parsed.

A shard is a USTAR tar written by webdataset's TarWriter. Each sample is one member,
`<key>.tokens.u16` (or `.u32`), holding `seqs_per_sample` sequences of raw little-endian ids; only
the last sample of a split may hold fewer. A member is a 512-byte header followed by its payload
padded to a multiple of 512 bytes, and the archive ends with two zero blocks, padded to tar's
10240-byte record. With S = seqs_per_sample and P = S * row_bytes:

    sample j starts at j * stride, stride = 512 + ceil512(P), its payload 512 bytes later;
    sequence k of a shard is row k % S of sample k // S.

So a shard's size follows from its sequence count (the manifest's sizes check the layout at load),
and a rank can pread exactly the bytes of the rows it needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TAR_BLOCK = 512  # header and payload padding unit
TAR_RECORD = 10240  # tarfile pads the archive to whole records (20 blocks)
SAMPLE_BYTES = 16384  # default payload: a block of the global shuffle; 4 pages, 3% tar overhead


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def default_seqs_per_sample(seq_len: int, itemsize: int) -> int:
    """Sequences per sample so that a sample's payload is about SAMPLE_BYTES (at least one sequence)."""
    return max(1, SAMPLE_BYTES // (seq_len * itemsize))


@dataclass(frozen=True)
class ShardLayout:
    """Byte offsets in a shard of `seq_len`-token sequences of `itemsize`-byte ids, `seqs_per_sample` per sample."""

    seq_len: int
    itemsize: int
    seqs_per_sample: int

    def __post_init__(self):
        if self.seq_len < 1 or self.itemsize < 1 or self.seqs_per_sample < 1:
            raise ValueError(f"seq_len, itemsize and seqs_per_sample must be >= 1, got {self.seq_len}, "
                             f"{self.itemsize}, {self.seqs_per_sample}")

    @property
    def row_bytes(self) -> int:
        """Bytes of one sequence."""
        return self.seq_len * self.itemsize

    @property
    def stride(self) -> int:
        """Bytes from one full sample's header to the next."""
        return TAR_BLOCK + _round_up(self.seqs_per_sample * self.row_bytes, TAR_BLOCK)

    def row_offsets(self, rows: np.ndarray) -> np.ndarray:
        """Byte offset in the shard of each row (sequence index within the shard)."""
        sample, within = np.divmod(np.asarray(rows, dtype=np.int64), self.seqs_per_sample)
        return sample * self.stride + TAR_BLOCK + within * self.row_bytes

    def shard_bytes(self, num_sequences: int) -> int:
        """Size of a shard holding `num_sequences` sequences (only its last sample partial)."""
        full, rest = divmod(num_sequences, self.seqs_per_sample)
        body = full * self.stride + (TAR_BLOCK + _round_up(rest * self.row_bytes, TAR_BLOCK) if rest else 0)
        return _round_up(body + 2 * TAR_BLOCK, TAR_RECORD)
