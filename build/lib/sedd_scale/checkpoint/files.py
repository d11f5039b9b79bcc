"""Checkpoint files: host-memory snapshots, checksummed writes, verified device-free reads.

* `to_host` copies a state (nested dicts/lists of tensors) to CPU memory: the only part of a save
  that has to stop training; the copy is then written at leisure.
* `write_files` torch.saves (path, state) pairs through a hashing file, so each file's size and
  sha256 are known when it is written (no reread), fsyncs them, and says why a write failed: a full
  disk or quota (ENOSPC, EDQUOT: the directory, its free space, what was left to write) apart from a
  file-size limit (EFBIG: `ulimit -f`, or the filesystem's largest file), which no free space cures.
* `read_verified` reads a whole file, checks its size and sha256 against what was recorded at write
  time, and unpickles it onto the CPU (map_location="cpu"): a checkpoint written on GPUs loads on a
  CPU-only machine and vice versa; the trainer moves tensors where they belong.
* `SnapshotIO` is a DeepSpeed checkpoint engine built from those: DeepSpeed's save_checkpoint hands it
  each file's state, which it snapshots instead of writing; its load verifies every file DeepSpeed reads.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import io
import os
import pickle
import resource
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import sedd_scale.compat  # noqa: F401  (before deepspeed)

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from sedd_scale.checkpoint.sharded import CheckpointError
from sedd_scale.checksums import HashingWriter

Record = dict[str, Any]  # {"bytes": int, "sha256": str}


def to_host(obj: Any) -> Any:
    """A copy of `obj` whose tensors live in CPU memory and share nothing with the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, (dict, OrderedDict)):
        return type(obj)((k, to_host(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [to_host(v) for v in obj]
    if type(obj) is tuple:
        return tuple(to_host(v) for v in obj)
    return copy.deepcopy(obj)  # numbers, strings, torch.Size, config objects


def nbytes(obj: Any) -> int:
    """Bytes of tensor data in a nested state (what a save of it writes, give or take the pickle)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def write_files(root: Path, files: list[tuple[Path, Any]]) -> dict[str, Record]:
    """torch.save each (path, state) (paths under `root`), fsynced; {path relative to root: record}.

    A failed write raises CheckpointError naming the file, the directory's free space and what this
    call still had to write.
    """
    records: dict[str, Record] = {}
    for i, (path, state) in enumerate(files):
        hashing = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                hashing = HashingWriter(f)
                torch.save(state, hashing)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:  # RuntimeError: torch's stream writer ("file write failed")
            cause = e if isinstance(e, OSError) else hashing.error if hashing is not None else None
            raise CheckpointError(_write_failure(root, path, cause or e, sum(nbytes(s) for _, s in files[i:]))) from e
        records[str(path.relative_to(root))] = {"bytes": hashing.size, "sha256": hashing.hash.hexdigest()}
    return records


def _write_failure(root: Path, path: Path, error: BaseException, left: int) -> str:
    """What went wrong writing `path` (under `root`) and what to do, by the errno of `error`."""
    code = getattr(error, "errno", None)
    where = root.parent
    free = shutil.disk_usage(where).free if where.exists() else 0
    kept = "the previous checkpoint stays `latest`"
    if code == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            return (f"could not write checkpoint file {path}: it reached this process's file-size limit, {limit} "
                    f"bytes (`ulimit -f` shows {limit // 1024}; EFBIG: {os.strerror(code)}), not a full disk ({where} "
                    f"has {free / 2**30:.2f} GiB free): raise the limit (`ulimit -f unlimited` in the job script) "
                    f"and resume; {kept}")
        return (f"could not write checkpoint file {path}: it is larger than the filesystem of {where} allows "
                f"(EFBIG: {os.strerror(code)}; no `ulimit -f` is set): put checkpoint.dir on a filesystem that holds "
                f"larger files; {kept}")
    if code in (errno.ENOSPC, errno.EDQUOT):
        full = "is full" if code == errno.ENOSPC else "is over its quota"
        return (f"could not write checkpoint file {path}: the filesystem of {where} {full} "
                f"({errno.errorcode[code]}: {os.strerror(code)}); it has {free / 2**30:.2f} GiB free and this rank "
                f"still had {left / 2**30:.2f} GiB to write: free at least that much there (or raise the quota), "
                f"or lower train.keep_last; {kept}")
    return (f"could not write checkpoint file {path} ({type(error).__name__}: {error}); {where} has "
            f"{free / 2**30:.2f} GiB free and this rank still had {left / 2**30:.2f} GiB to write; {kept}")


def read_verified(path: Path, record: Record | None, *, fix: str) -> Any:
    """torch.load `path` onto the CPU after checking its size and sha256 against `record`.

    `fix` says what to do about a damaged file (e.g. resume from the previous step).
    """
    if record is None:
        raise CheckpointError(f"{path} is not among the files recorded in its checkpoint's meta.json: it was not "
                              f"written with this checkpoint; {fix}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing: {fix}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != record["bytes"] or digest != record["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is damaged: {len(data)} bytes with sha256 {digest[:16]}..., "
                              f"but {record['bytes']} bytes with sha256 {record['sha256'][:16]}... were written; "
                              f"{fix}")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, AttributeError, ImportError) as e:
        # the bytes are what was written, so this is a version mismatch, not damage
        raise CheckpointError(f"checkpoint file {path} is intact but cannot be unpickled ({type(e).__name__}: "
                              f"{e}): was it written by another torch/DeepSpeed version? {fix}") from e


class SnapshotIO(CheckpointEngine):
    """DeepSpeed checkpoint engine: `save` snapshots to host memory (take them with `take`), `load` verifies.

    Before a load, `expect(step_dir, records, fix)` gives the records of the step being read.
    """

    def __init__(self):
        super().__init__()
        self.name = "sedd-scale snapshot"
        self.pending: list[tuple[Path, Any]] = []
        self._root: Path | None = None
        self._records: dict[str, Record] = {}
        self._fix = ""

    def create(self, info) -> None:  # noqa: D102  (DeepSpeed's hook before a save)
        pass

    def makedirs(self, path, exist_ok=False) -> None:  # noqa: D102  (rank 0 makes the staging folder)
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict, path: str) -> None:
        """Keep a host copy of one file's state."""
        self.pending.append((Path(path), to_host(state_dict)))

    def take(self) -> list[tuple[Path, Any]]:
        """The snapshots of the files DeepSpeed saved since the last call."""
        out, self.pending = self.pending, []
        return out

    def commit(self, info) -> bool:  # noqa: D102  (the trainer commits the whole step)
        return True

    def preserves_storage_sharing(self) -> bool:  # noqa: D102  (to_host copies each tensor compactly)
        return False

    def expect(self, root: Path, records: dict[str, Record], fix: str) -> None:
        """The step folder about to be read and its files' records."""
        self._root, self._records, self._fix = Path(root), records, fix

    def load(self, path: str, map_location=None) -> Any:
        """One file of the expected step, verified, on the CPU (DeepSpeed copies it where it belongs)."""
        if self._root is None:
            raise CheckpointError(f"{path}: no checkpoint records to verify against (call expect() first)")
        path = Path(path)
        return read_verified(path, self._records.get(str(path.relative_to(self._root))), fix=self._fix)
