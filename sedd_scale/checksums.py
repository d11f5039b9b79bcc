"""sha256 records of checkpoint files, written when the files are and checked before they are used.

Training checkpoints keep them in their step's meta.json (`sharded.py`). Exported directories
(consolidated, hub) keep them in `SHA256SUMS`, the format of `sha256sum` (so `sha256sum -c
SHA256SUMS` checks a copy anywhere), listing every file but itself.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

SUMS_FILE = "SHA256SUMS"


class ChecksumError(ValueError):
    """A file whose bytes are not the ones recorded when it was written."""


class HashingWriter:
    """A write-only file object that hashes (sha256) and counts what passes through it: a file's record is
    known when it is written, without reading it back."""

    def __init__(self, f):
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        """Hash, count and write `data`."""
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        """Flush the underlying file."""
        self.f.flush()


def file_record(path: Path) -> dict:
    """{"bytes", "sha256"} of a file, read in 8 MiB blocks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
            size += len(block)
    return {"bytes": size, "sha256": h.hexdigest()}


def write_sums(folder: Path) -> Path:
    """Record every file under `folder` (recursively) in `folder/SHA256SUMS`, atomically."""
    folder = Path(folder)
    lines = [f"{file_record(p)['sha256']}  {p.relative_to(folder).as_posix()}\n"
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SUMS_FILE]
    tmp = folder / f".{SUMS_FILE}.tmp"
    tmp.write_text("".join(lines))
    os.replace(tmp, folder / SUMS_FILE)
    return folder / SUMS_FILE


def read_sums(folder: Path) -> dict[str, str] | None:
    """{relative path: sha256} from `folder/SHA256SUMS`, or None when the folder has no such file."""
    path = Path(folder) / SUMS_FILE
    if not path.is_file():
        return None
    out = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ChecksumError(f"{path}, line {number}: not a `sha256sum` line ({line[:80]!r})")
        out[name] = digest
    return out


def verify_sums(folder: Path, names: list[str] | None = None, *, required: bool = True) -> None:
    """Check the files `names` (default: all listed) against `folder/SHA256SUMS`; ChecksumError naming the first
    that differs, or a missing SHA256SUMS when `required`."""
    folder = Path(folder)
    sums = read_sums(folder)
    if sums is None:
        if required:
            raise ChecksumError(f"{folder} has no {SUMS_FILE}: it was not written by this version's tools, or is "
                                "incomplete; write it again with tools/convert_checkpoint.py")
        return
    for name in names if names is not None else sorted(sums):
        path = folder / name
        if name not in sums:
            raise ChecksumError(f"{path} is not listed in {folder / SUMS_FILE}: it was not written with this "
                                "checkpoint; write the directory again with tools/convert_checkpoint.py")
        if not path.is_file():
            raise ChecksumError(f"{path} is missing: copy the whole directory again, or write it again with "
                                "tools/convert_checkpoint.py")
        got = file_record(path)["sha256"]
        if got != sums[name]:
            raise ChecksumError(f"{path} is damaged: its sha256 is {got[:16]}..., {SUMS_FILE} recorded "
                                f"{sums[name][:16]}... when it was written; copy it again from the source, or write "
                                "the directory again with tools/convert_checkpoint.py")
