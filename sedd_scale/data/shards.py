"""webdataset tar shards of packed token sequences: writing, reading and verifying.

A shard is a plain tar (readable by `webdataset.WebDataset`): each sample `<key>.tokens.u16`
(or `.u32`) holds up to `seqs_per_sample` sequences as raw little-endian integers, several per
sample because per-sample overhead dominates reading. `<key>` is the split-wide index of the
sample's first sequence. Tar headers carry no time or owner, so the same data gives the same
bytes and sha256.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from sedd_scale.data.fetch import sha256_bytes, sha256_file
from sedd_scale.data.manifest import DTYPES, ShardInfo


class ShardError(ValueError):
    """A shard that is missing, truncated, corrupt or inconsistent with its manifest entry."""


def field_name(dtype: str) -> str:
    """The sample field holding the tokens, e.g. "tokens.u16"."""
    return f"tokens.u{DTYPES[dtype].itemsize * 8}"


class ShardWriter:
    """Writes packed sequences into `<prefix>-NNNNNN.tar` shards of `seqs_per_shard` sequences (rounded down to
    a multiple of `seqs_per_sample`, so only the last sample of a split is partial)."""

    def __init__(self, out_dir: Path, prefix: str, seq_len: int, dtype: str, seqs_per_sample: int,
                 seqs_per_shard: int):
        if seqs_per_shard < 1 or seqs_per_sample < 1:
            raise ValueError(f"seqs_per_shard and seqs_per_sample must be >= 1, got {seqs_per_shard}, "
                             f"{seqs_per_sample}")
        self.out_dir, self.prefix, self.seq_len = Path(out_dir), prefix, seq_len
        self.dtype, self.seqs_per_sample = DTYPES[dtype], seqs_per_sample
        self.seqs_per_shard = max(seqs_per_sample, seqs_per_shard // seqs_per_sample * seqs_per_sample)
        self.field = field_name(dtype)
        self.shards: list[ShardInfo] = []
        self._pending: list[np.ndarray] = []
        self._num_pending = 0
        self._written = 0  # sequences already in closed shards

    def write(self, seqs: np.ndarray) -> None:
        """Queue (n, seq_len) sequences; full shards are written as they fill."""
        if seqs.ndim != 2 or seqs.shape[1] != self.seq_len:
            raise ValueError(f"expected (n, {self.seq_len}) sequences, got shape {seqs.shape}")
        self._pending.append(seqs)
        self._num_pending += len(seqs)
        while self._num_pending >= self.seqs_per_shard:
            self._flush(self.seqs_per_shard)

    def close(self) -> list[ShardInfo]:
        """Write the last, partial shard; return every shard's manifest entry."""
        if self._num_pending:
            self._flush(self._num_pending)
        return self.shards

    def _flush(self, n: int) -> None:
        block = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        shard, rest = block[:n], block[n:]
        self._pending, self._num_pending = ([rest] if len(rest) else []), len(rest)
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        path = self.out_dir / name
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for start in range(0, n, self.seqs_per_sample):
                payload = shard[start:start + self.seqs_per_sample].astype(self.dtype).tobytes()
                info = tarfile.TarInfo(f"{self._written + start:012d}.{self.field}")
                info.size, info.mode, info.mtime = len(payload), 0o644, 0
                tar.addfile(info, io.BytesIO(payload))
        tmp.replace(path)
        self._written += n
        self.shards.append(ShardInfo(name, n, path.stat().st_size, sha256_file(path)))


def check_present(path: Path, info: ShardInfo) -> None:
    """Raise ShardError if the shard is missing or its size differs from the manifest (cheap: one stat)."""
    if not path.is_file():
        raise ShardError(f"missing shard {path}: restore it or prepare the data again with tools/prepare_data.py")
    size = path.stat().st_size
    if size != info.num_bytes:
        raise ShardError(f"shard {path} is {size} bytes but the manifest says {info.num_bytes}: the file is "
                         "truncated or was rewritten; restore it or prepare the data again "
                         "(or set skip_corrupt to skip it)")


def read_shard(path: Path, info: ShardInfo, seq_len: int, dtype: str, verify: bool = True) -> np.ndarray:
    """All sequences of one shard as an (n, seq_len) array, checking size, sha256 (if `verify`) and structure."""
    check_present(path, info)
    data = path.read_bytes()
    if verify and sha256_bytes(data) != info.sha256:
        raise ShardError(f"sha256 mismatch for shard {path}: expected {info.sha256}, got {sha256_bytes(data)}; "
                         "the file is corrupt or was modified: restore it or prepare the data again "
                         "(or set skip_corrupt to skip it)")
    np_dtype, field = DTYPES[dtype], field_name(dtype)
    row_bytes = seq_len * np_dtype.itemsize
    parts = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                end = member.offset_data + member.size
                if not member.isfile() or not member.name.endswith("." + field):
                    raise ShardError(f"shard {path}: unexpected member {member.name!r} (expected *.{field})")
                if end > len(data) or member.size % row_bytes:
                    raise ShardError(f"shard {path}: member {member.name!r} is truncated ({member.size} bytes, "
                                     f"not a whole number of {seq_len}-token sequences, or past the file end)")
                parts.append(np.frombuffer(data, dtype=np_dtype, count=member.size // np_dtype.itemsize,
                                           offset=member.offset_data))
    except tarfile.TarError as e:
        raise ShardError(f"shard {path} is not a readable tar ({e}): restore it or prepare the data again") from e
    seqs = np.concatenate(parts).reshape(-1, seq_len) if parts else np.empty((0, seq_len), np_dtype)
    if len(seqs) != info.num_sequences:
        raise ShardError(f"shard {path} holds {len(seqs)} sequences but the manifest says {info.num_sequences}")
    return seqs


def verify_shard(path: Path, info: ShardInfo, seq_len: int, dtype: str) -> str | None:
    """None if the shard is intact, else the reason it is not."""
    try:
        read_shard(path, info, seq_len, dtype, verify=True)
    except ShardError as e:
        return str(e)
    return None
