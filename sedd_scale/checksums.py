"""sha256 records of checkpoint files, written when the files are and checked before they are used.

Exported directories (consolidated, hub) keep them in `SHA256SUMS`, the format of `sha256sum` (so
`sha256sum -c SHA256SUMS` checks a copy anywhere), listing every file but itself. Training checkpoints
keep them in their step's meta.json (`sharded.py`) and a SHA256SUMS beside it that covers meta.json too.
A file is checked before it is parsed, so damage is reported as damage to that file, never as a
parser's message about its content.

In a distributed job the files are hashed once, not once per rank (`once`): every rank loading a 7B model's
27.8 GB of weights from shared storage would read 28.5 TB on 1,024 GPUs just to hash them.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

SUMS_FILE = "SHA256SUMS"
_HEX = frozenset("0123456789abcdef")
# What to do about a damaged exported directory (training checkpoints pass their own advice).
FIX = "copy it again from the source, or write the directory again with tools/convert_checkpoint.py"


class ChecksumError(ValueError):
    """A file whose bytes are not the ones recorded when it was written."""


class HashingWriter:
    """A write-only file object that hashes (sha256) and counts what passes through it: a file's record is
    known when it is written, without reading it back."""

    def __init__(self, f):
        self.f, self.hash, self.size = f, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch's writer replaces it with a RuntimeError that has no errno

    def write(self, data) -> int:
        """Hash, count and write `data` (an OSError is kept in `error` and raised)."""
        self.hash.update(data)
        self.size += len(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        """Flush the underlying file."""
        self.f.flush()


def once(check: Callable[[], object], errors: tuple[type[Exception], ...] = (ChecksumError,), group=None) -> None:
    """Run `check` on the first rank of `group` (default: the default group) only, and raise the error it raised
    (one of `errors`) on every rank: a collective, so call it on every rank of the group. Without a process group,
    or in a world of one, it is just `check()`.

    One rank suffices because the files are read from storage every rank shares (the usual case): each rank would
    hash the same bytes. Where each node holds its own copy on a local disk, pass one group per node
    (`torch.distributed.new_subgroups()`), so the first rank of each node checks that node's copy.
    """
    import torch.distributed as dist  # here: the data tools import this module and must start without torch

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        check()
        return
    src = 0 if group is None else dist.get_global_rank(group, 0)
    verdict: list = [None]  # None: the files are intact; else the error every rank raises
    failed = None
    if dist.get_rank() == src:
        try:
            check()
        except errors as e:
            verdict = [e]
        except Exception as e:  # told to the others too, so that no rank waits for a verdict that never comes
            verdict, failed = [f"rank {src} could not check the files ({type(e).__name__}: {e}): see its error"], e
    dist.broadcast_object_list(verdict, src=src, group=group)
    if failed is not None:
        raise failed
    if isinstance(verdict[0], str):
        raise RuntimeError(verdict[0])
    if verdict[0] is not None:
        raise verdict[0]


def file_record(path: Path) -> dict:
    """{"bytes", "sha256"} of a file, read in 8 MiB blocks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
            size += len(block)
    return {"bytes": size, "sha256": h.hexdigest()}


def write_sums(folder: Path, known: dict[str, str] | None = None) -> Path:
    """Record every file under `folder` (recursively) in `folder/SHA256SUMS`, atomically; `known` gives the sha256
    of files (by relative path) already hashed as they were written, so they are not read again."""
    folder, known = Path(folder), known or {}
    names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
             if p.is_file() and p.relative_to(folder).as_posix() != SUMS_FILE]
    lines = [f"{known.get(name) or file_record(folder / name)['sha256']}  {name}\n" for name in names]
    tmp = folder / f".{SUMS_FILE}.tmp"
    tmp.write_text("".join(lines))
    os.replace(tmp, folder / SUMS_FILE)
    return folder / SUMS_FILE


def read_sums(folder: Path, *, fix: str = FIX) -> dict[str, str] | None:
    """{relative path: sha256} from `folder/SHA256SUMS`, or None when the folder has no such file; ChecksumError
    (ending with `fix`) when it is damaged."""
    path = Path(folder) / SUMS_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ChecksumError(f"{path} is damaged: not UTF-8 text ({e}); {fix}") from None
    out = {}
    lines = text.split("\n")  # as sha256sum writes them (splitlines would also split at \f, \x1c, ...)
    for number, line in enumerate(lines[:-1] if lines[-1] == "" else lines, 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not set(digest) <= _HEX or not name:  # sha256sum writes lowercase hex
            raise ChecksumError(f"{path} is damaged: line {number} is not a `sha256sum` line ({line[:80]!r}); {fix}")
        out[name] = digest
    return out


def verify_sums(folder: Path, names: list[str] | None = None, *, required: bool = True, fix: str = FIX) -> bool:
    """Check the files `names` (default: all listed) against `folder/SHA256SUMS`; ChecksumError naming the first
    that differs (ending with `fix`), or a missing SHA256SUMS when `required`. Returns whether anything was checked
    (False: no SHA256SUMS)."""
    folder = Path(folder)
    sums = read_sums(folder, fix=fix)
    if sums is None:
        if required:
            raise ChecksumError(f"{folder} has no {SUMS_FILE}: it was not written by this version's tools, or is "
                                "incomplete; write it again with tools/convert_checkpoint.py")
        return False
    absent = sorted(name for name in sums if not (folder / name).is_file())
    if absent:  # first: a damaged name in SHA256SUMS shows as a listed file that is not there
        raise ChecksumError(f"{folder / absent[0]} is missing: {folder / SUMS_FILE} lists it ({len(absent)} listed "
                            f"file(s) missing; or SHA256SUMS is damaged); {fix}")
    for name in names if names is not None else sorted(sums):
        path = folder / name
        if name not in sums:
            raise ChecksumError(f"{path} is not listed in {folder / SUMS_FILE}: it was not written with this "
                                f"checkpoint, or SHA256SUMS is damaged; {fix}")
        got = file_record(path)["sha256"]
        if got != sums[name]:
            raise ChecksumError(f"{path} is damaged: its sha256 is {got[:16]}..., {SUMS_FILE} recorded "
                                f"{sums[name][:16]}... when it was written; {fix}")
    return True


def verified_text(folder: Path, name: str, *, required: bool = True, fix: str = FIX) -> str:
    """The text of `folder/name`, read only once its sha256 matches `folder/SHA256SUMS` (absent: unchecked unless
    `required`); ChecksumError naming the file otherwise, also for bytes that are not UTF-8."""
    folder = Path(folder)
    verify_sums(folder, [name], required=required, fix=fix)
    try:
        return (folder / name).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ChecksumError(f"{folder / name} is damaged: not UTF-8 text ({e}); {fix}") from None
