"""Reading sequences of shards by byte range: only the rows asked for, each checked against its CRC32.

Rows sorted by position are cut into runs of consecutive rows; each run is one pread of its bytes
(a run crossing into the next sample also reads the 512-byte header between, which shares a page
with the rows anyway) plus one pread of its CRC32s from the sidecar. Descriptors stay open in a
small LRU per process, with POSIX_FADV_RANDOM so the kernel reads no ahead: the pages a rank
touches are the pages of its rows, not the shard around them. Shards given as URLs are fetched
whole into the local cache (`urlcache.py`) first and then read the same way.
"""
from __future__ import annotations

import os
import zlib
from collections import OrderedDict

import numpy as np

from sedd_scale.data.manifest import ShardRef
from sedd_scale.data.shards import ShardError
from sedd_scale.data.tar_layout import ShardLayout
from sedd_scale.data.urlcache import UrlCache, damaged_copy_advice, is_url

# A resume refuses other data, so only restoring the shards continues a run; anything else is a new run.
CRC_ADVICE = ("run `python tools/prepare_data.py --verify MANIFEST` to list every damaged shard, then restore them "
              "from a copy (a run resumes only on the data it started with); or start a new checkpoint.dir, with the "
              "data prepared again or the damaged shards moved away and data.skip_corrupt: true")


class RowReader:
    """Reads rows of shards with pread on an LRU of open descriptors (readahead off), CRC32-checked."""

    def __init__(self, layout: ShardLayout, dtype: np.dtype, *, verify: bool = True, max_open: int = 64,
                 cache: UrlCache | None = None):
        if max_open < 2:
            raise ValueError(f"max_open must be >= 2 (a shard and its sidecar), got {max_open}")
        self.layout, self.dtype, self.verify = layout, np.dtype(dtype), verify
        self.max_open, self.cache = max_open, cache
        self._fds: OrderedDict[str, int] = OrderedDict()

    def __getstate__(self):  # a copy (a DataLoader worker) opens its own descriptors
        return {**self.__dict__, "_fds": OrderedDict()}

    def close(self) -> None:
        """Close every cached descriptor."""
        fds = getattr(self, "_fds", None)  # absent if __init__ failed
        while fds:
            os.close(fds.popitem()[1])

    def __del__(self):
        self.close()

    def _local(self, location: str, size: int, sha256: str, suffix: str) -> str:
        if not is_url(location):
            return location
        if self.cache is None:
            raise ValueError(f"{location} is a URL but this reader has no cache directory")
        return str(self.cache.fetch(location, size, sha256, suffix))

    def _fd(self, path: str, what: str) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ShardError(f"{what} {path} disappeared since the run started: restore it") from None
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # read exactly the pages asked for
        self._fds[path] = fd
        while len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    @staticmethod
    def _pread(fd: int, size: int, offset: int, where: str, fix: str = "restore it or prepare the data again") -> bytes:
        data = os.pread(fd, size, offset)
        while len(data) < size:  # short reads happen (signals, network filesystems); EOF means truncation
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                raise ShardError(f"{where} ends before byte {offset + size}: it was truncated since the run "
                                 f"started; {fix}")
            data += more
        return data

    def read(self, ref: ShardRef, rows: np.ndarray) -> np.ndarray:
        """Sequences `rows` of shard `ref`, in that order: (len(rows), seq_len) of the token dtype."""
        info, layout = ref.info, self.layout
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), layout.seq_len), dtype=self.dtype)
        if rows.size == 0:
            return out
        if rows.min() < 0 or rows.max() >= info.num_sequences:
            raise ValueError(f"rows outside [0, {info.num_sequences}) of shard {ref.tar}")
        tar_path = self._local(ref.tar, info.num_bytes, info.sha256, ".tar")
        cached = tar_path != ref.tar
        where = f"{ref.tar} (cached as {tar_path})" if cached else ref.tar
        truncated = (f"delete {tar_path} (the next read fetches it again)" if cached
                     else "restore it or prepare the data again")
        tar = self._fd(tar_path, "shard")
        if self.verify:
            crc_path = self._local(ref.crc, info.crc_bytes, info.crc_sha256, ".crc32")
            crc = self._fd(crc_path, "CRC sidecar")
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        offsets = layout.row_offsets(ordered)
        size = layout.row_bytes
        for run in np.split(np.arange(len(ordered)), np.flatnonzero(np.diff(ordered) != 1) + 1):
            start = int(offsets[run[0]])
            buf = memoryview(self._pread(tar, int(offsets[run[-1]]) + size - start, start, where, truncated))
            if self.verify:
                stored = np.frombuffer(self._pread(crc, 4 * len(run), 4 * int(ordered[run[0]]), ref.crc), "<u4")
            for k, i in enumerate(run):
                piece = buf[int(offsets[i]) - start:][:size]
                if self.verify and zlib.crc32(piece) != stored[k]:
                    row = int(ordered[i])
                    key = ref.first + row // layout.seqs_per_sample * layout.seqs_per_sample
                    # A cached copy is ours to replace: name the damaged file(s), not the (intact) object behind.
                    why = (damaged_copy_advice([(tar_path, info.sha256), (crc_path, info.crc_sha256)]) if cached else
                           f"the shard or its sidecar {ref.crc} changed after it was prepared; {CRC_ADVICE}")
                    raise ShardError(
                        f"sequence {row} of shard {where} (sample {key:012d}) fails its CRC32 check (stored "
                        f"{int(stored[k]):08x}, read {zlib.crc32(piece):08x}): {why}")
                out[order[i]] = np.frombuffer(piece, dtype=self.dtype)
        return out
