"""webdataset tar shards of packed token sequences, with a CRC32 sidecar: writing and full verification.

A shard is a plain tar written by `webdataset.TarWriter` (readable by `webdataset.WebDataset`): each
sample `<key>.tokens.u16` (or `.u32`) holds `seqs_per_sample` sequences as raw little-endian ids,
`<key>` the split-wide index of its first sequence. Tar headers carry no time or owner, so the same
data gives the same bytes and sha256, and every sample but a split's last has the same size: the
offsets of `layout.py` hold, and the writer checks them. Next to `<name>.tar`, `<name>.crc32` holds
the CRC32 of every sequence (uint32, little-endian): 0.2% of the data at 1024 uint16 tokens, read
with the rows it checks.

`verify_shard` (prepare_data --verify) checks everything: sizes, both sha256s, the tar structure
against the layout, and every sequence's CRC32. The training loader checks only sizes at start and
the CRC32 of the rows it reads (`reader.py`).
"""
from __future__ import annotations

import io
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np

from sedd_scale.checksums import HashingWriter
from sedd_scale.data.fetch import sha256_bytes
from sedd_scale.data.manifest import DTYPES, ShardInfo, ShardRef
from sedd_scale.data.tar_layout import ShardLayout


class ShardError(ValueError):
    """A shard that is missing, truncated, corrupt or inconsistent with its manifest entry."""


def file_problem(location: str, size: int, what: str, fix: str) -> str | None:
    """Why the file at `location` is not the `size` bytes a manifest recorded (missing, or another size), or None."""
    try:
        got = os.stat(location).st_size
    except FileNotFoundError:
        return f"missing {what} {location}: {fix}"
    if got != size:
        return (f"{what} {location} is {got} bytes but the manifest says {size}: the file is truncated or was "
                f"rewritten; {fix}")
    return None


def field_name(dtype: str) -> str:
    """The sample field holding the tokens, e.g. "tokens.u16"."""
    return f"tokens.u{DTYPES[dtype].itemsize * 8}"


def row_crcs(rows: np.ndarray) -> np.ndarray:
    """CRC32 (zlib's) of each row's little-endian bytes, as uint32."""
    rows = np.ascontiguousarray(rows)
    return np.fromiter((zlib.crc32(r) for r in rows), dtype="<u4", count=len(rows))


class ShardWriter:
    """Writes packed sequences into `<prefix>-NNNNNN.tar` shards (+ `.crc32` sidecars) of `seqs_per_shard`
    sequences (rounded down to a multiple of `seqs_per_sample`, so only the last sample of a split is partial)."""

    def __init__(self, out_dir: Path, prefix: str, seq_len: int, dtype: str, seqs_per_sample: int,
                 seqs_per_shard: int):
        if seqs_per_shard < 1 or seqs_per_sample < 1:
            raise ValueError(f"seqs_per_shard and seqs_per_sample must be >= 1, got {seqs_per_shard}, "
                             f"{seqs_per_sample}")
        self.out_dir, self.prefix, self.seq_len = Path(out_dir), prefix, seq_len
        self.dtype, self.seqs_per_sample = DTYPES[dtype], seqs_per_sample
        self.layout = ShardLayout(seq_len, self.dtype.itemsize, seqs_per_sample)
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
        import webdataset as wds

        block = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        rows, rest = block[:n].astype(self.dtype), block[n:]
        self._pending, self._num_pending = ([rest] if len(rest) else []), len(rest)
        stem = f"{self.prefix}-{len(self.shards):06d}"
        path, crc_path = self.out_dir / f"{stem}.tar", self.out_dir / f"{stem}.crc32"
        tmp = path.with_suffix(".tar.tmp")
        with open(tmp, "wb") as raw:
            sink = HashingWriter(raw)
            with wds.TarWriter(sink, user="", group="", mode=0o644, mtime=0, encoder=False,
                               format=tarfile.USTAR_FORMAT) as tar:
                for start in range(0, n, self.seqs_per_sample):
                    tar.write({"__key__": f"{self._written + start:012d}",
                               self.field: rows[start:start + self.seqs_per_sample].tobytes()})
        if sink.size != self.layout.shard_bytes(n):  # the loader computes offsets: never write another layout
            tmp.unlink()
            raise RuntimeError(f"webdataset wrote {sink.size} bytes for {n} sequences, the fixed layout needs "
                               f"{self.layout.shard_bytes(n)}: its tar writer changed; pin webdataset")
        crcs = row_crcs(rows).tobytes()
        crc_tmp = crc_path.with_suffix(".crc32.tmp")
        crc_tmp.write_bytes(crcs)
        crc_tmp.replace(crc_path)
        tmp.replace(path)
        self._written += n
        self.shards.append(ShardInfo(path.name, n, sink.size, sink.hash.hexdigest(), crc_path.name,
                                     sha256_bytes(crcs)))


def read_shard(data: bytes, where: str, info: ShardInfo, layout: ShardLayout, dtype: str) -> np.ndarray:
    """All sequences of a shard's bytes, parsed as a tar (not through the layout), each member checked against it."""
    np_dtype, field = DTYPES[dtype], field_name(dtype)
    parts = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for j, member in enumerate(tar):
                if not member.isfile() or not member.name.endswith("." + field):
                    raise ShardError(f"shard {where}: unexpected member {member.name!r} (expected *.{field})")
                if member.offset_data + member.size > len(data) or member.size % layout.row_bytes:
                    raise ShardError(f"shard {where}: member {member.name!r} is truncated ({member.size} bytes, "
                                     f"not a whole number of {layout.seq_len}-token sequences, or past the file end)")
                if member.offset_data != int(layout.row_offsets([j * layout.seqs_per_sample])[0]):
                    raise ShardError(f"shard {where}: member {member.name!r} starts at byte {member.offset_data}, "
                                     "not where the fixed layout puts it")
                parts.append(np.frombuffer(data, dtype=np_dtype, count=member.size // np_dtype.itemsize,
                                           offset=member.offset_data))
    except tarfile.TarError as e:
        raise ShardError(f"shard {where} is not a readable tar ({e}): restore it or prepare the data again") from e
    seqs = np.concatenate(parts).reshape(-1, layout.seq_len) if parts else np.empty((0, layout.seq_len), np_dtype)
    if len(seqs) != info.num_sequences:
        raise ShardError(f"shard {where} holds {len(seqs)} sequences but the manifest says {info.num_sequences}")
    return seqs


def verify_shard(tar_path: Path, crc_path: Path, ref: ShardRef, layout: ShardLayout, dtype: str) -> str | None:
    """None if a shard (local files) is intact, else what is wrong: sizes, sha256s, tar structure, every CRC32."""
    info = ref.info
    for path, size, sha, what in ((tar_path, info.num_bytes, info.sha256, "shard"),
                                  (crc_path, info.crc_bytes, info.crc_sha256, "CRC sidecar")):
        if not path.is_file():
            return f"{what} {ref.tar if what == 'shard' else ref.crc} is missing"
        data = path.read_bytes()
        if len(data) != size:
            return f"{what} {path} is {len(data)} bytes but the manifest says {size}"
        if sha256_bytes(data) != sha:
            return f"sha256 mismatch for {what} {path}: expected {sha}, got {sha256_bytes(data)}"
    try:
        seqs = read_shard(tar_path.read_bytes(), str(tar_path), info, layout, dtype)
    except ShardError as e:
        return str(e)
    stored = np.frombuffer(crc_path.read_bytes(), dtype="<u4")
    bad = np.flatnonzero(row_crcs(seqs) != stored)
    if bad.size:  # both sha256s matched: the manifest itself is inconsistent
        return f"shard {tar_path}: {bad.size} sequence(s) disagree with the CRC sidecar, first {int(bad[0])}"
    return None
