"""Prepare a token dataset: tokenize documents in parallel, pack them, write shards and a manifest.

The library half of `tools/prepare_data.py`. Documents are tokenized in chunks by a process
pool (results consumed in order, so output bytes do not depend on the worker count), packed per
split (`packing.py`) and written as shards (`shards.py`). When the source has no "valid" split,
every k-th document (k = round(1 / valid_fraction)) is held out for validation: a split by
documents, spread evenly over the corpus.

The dataset is built in a temporary sibling of the output directory and renamed into place when
complete, so a failure or crash midway leaves no half-written dataset, and with `overwrite` the
old dataset stays whole until the new one is ready. A non-empty output directory is refused unless
`overwrite` is set, and even then only if it holds nothing but a prepared dataset. The siblings'
names carry their owner (`.OUT.tmp-PID@HOST.*`, `.OUT.old-PID@HOST.*`), so that the next preparation
of OUT removes those of a process that is gone (killed midway); never one of a live process, nor one
of another host (whose processes cannot be seen from here), nor an old dataset not yet replaced.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
from tqdm import tqdm

from sedd_scale.data.manifest import DTYPES, Manifest, SplitInfo, TokenizerInfo
from sedd_scale.data.packing import Packer
from sedd_scale.data.shards import ShardWriter
from sedd_scale.data.tar_layout import default_seqs_per_sample
from sedd_scale.data.tokenizer import get_tokenizer, is_tokenizer_file

T = TypeVar("T")
DATASET_SUFFIXES = (".tar", ".crc32", ".tmp")  # what a prepared dataset directory holds besides manifest.json


class PrepareError(ValueError):
    """An output directory that cannot take the dataset (it names the directory and the fix)."""


@dataclass
class PrepareConfig:
    """How to tokenize, pack and shard."""

    out: Path
    tokenizer: str = "gpt2"  # gpt2, byte or the path of a Hugging Face tokenizer.json
    seq_len: int = 1024
    valid_fraction: float = 0.01  # documents held out when the source has no "valid" split; 0: none
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    seqs_per_sample: int = 0  # 0: a 16 KiB sample (layout.SAMPLE_BYTES), the block of the global shuffle
    shard_tokens: int = 1 << 24  # about 32 MiB of uint16 tokens per shard
    chunk_docs: int = 256  # documents per tokenization task
    progress: bool = True
    eos_token: str | None = None  # a tokenizer.json's end-of-document token (None: found among its specials)
    overwrite: bool = False  # replace the prepared dataset already in `out`

    def __post_init__(self):
        self.out = Path(self.out)
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.valid_fraction < 0.5:
            raise ValueError(f"valid_fraction must be in [0, 0.5), got {self.valid_fraction}")
        if self.workers < 1 or self.chunk_docs < 1 or self.shard_tokens < 1 or self.seqs_per_sample < 0:
            raise ValueError("workers, chunk_docs and shard_tokens must be >= 1 and seqs_per_sample >= 0")


@dataclass
class PrepareStats:
    """What `prepare` did and how fast."""

    manifest: Manifest
    seconds: float
    documents: int
    text_bytes: int
    tokens: int

    def summary(self) -> str:
        """One line of throughput."""
        return (f"{self.documents:,} documents, {self.text_bytes / 1e6:.1f} MB of text -> {self.tokens:,} tokens in "
                f"{self.seconds:.2f} s: {self.tokens / self.seconds / 1e6:.2f}M tokens/s, "
                f"{self.text_bytes / self.seconds / 1e6:.1f} MB/s")


def _encode_chunk(task: tuple[str, str | None, list[str]]) -> tuple[np.ndarray, np.ndarray, int]:
    spec, eos_token, texts = task
    ids, lengths = get_tokenizer(spec, eos_token).encode_documents(texts)
    return ids, lengths, sum(len(t.encode("utf-8")) for t in texts)


def ordered_map(fn: Callable, tasks: Iterable, workers: int) -> Iterator:
    """fn over tasks in a process pool, results in task order, at most 4 tasks per worker in flight."""
    if workers == 1:
        yield from map(fn, tasks)
        return
    # fork starts workers in milliseconds; spawn (other platforms) re-imports this module.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def chunks(docs: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    it = iter(docs)
    while chunk := list(islice(it, size)):
        yield chunk


def dtype_for(vocab_size: int) -> str:
    """The shard token dtype of a vocabulary: uint16 when its ids fit, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, a non-empty directory (without overwrite), or holds more than a dataset."""
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file, not a directory: choose a directory for the dataset")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise PrepareError(f"--out {out} is not empty ({len(entries)} entries, e.g. {entries[0]}): choose a new or "
                           "empty directory, or pass --overwrite to replace the dataset in it")
    foreign = [e for e in entries if e != "manifest.json" and not e.endswith(DATASET_SUFFIXES)]
    if "manifest.json" not in entries or foreign:
        what = ("has no manifest.json" if "manifest.json" not in entries
                else f"holds {foreign[0]!r}, which is not part of a dataset")
        raise PrepareError(f"--out {out} {what}: --overwrite only replaces a prepared dataset (manifest.json, "
                           "*.tar, *.crc32); move the other files away or choose another directory")


def _sibling(out: Path, kind: str) -> Path:
    """A new temporary sibling of `out` (kind "tmp": the dataset being built, "old": the one it replaces), its
    name recording this process and host so that a later preparation can tell whether its owner is gone."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}@{socket.gethostname()}.", dir=out.parent))


def _owner_alive(pid: int, host: str) -> bool | None:
    """Whether process `pid` of `host` runs; None for another host (its processes cannot be seen from here)."""
    if host != socket.gethostname():
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_siblings(out: Path) -> list[str]:
    """Remove the temporary siblings of `out` left by preparations whose process is gone; returns a line per sibling
    removed or left (one of another host or of an unknown owner, an old dataset that `out` has not replaced)."""
    notes: list[str] = []
    if not out.parent.is_dir():
        return notes
    for path in sorted(out.parent.iterdir()):
        kind = next((k for k in ("tmp", "old") if path.name.startswith(f".{out.name}.{k}-")), None)
        if kind is None or not path.is_dir():
            continue
        owner, _, _ = path.name[len(f".{out.name}.{kind}-"):].rpartition(".")
        pid, _, host = owner.partition("@")
        alive = _owner_alive(int(pid), host) if pid.isdigit() and host else None
        if alive:
            continue
        if alive is None:
            who = f"process {pid} on host {host}" if pid.isdigit() and host else "an unknown process"
            notes.append(f"left {path}: a temporary folder of a preparation of {out} by {who}, which this host cannot "
                         "check; delete it once no preparation of that directory runs")
        elif kind == "old" and not (out / "manifest.json").is_file():
            # Killed between the two renames: this is the previous dataset, and nothing replaced it.
            notes.append(f"left {path}: it holds the dataset {out} had before a preparation (process {pid}) was "
                         f"killed while replacing it; rename it back to {out} to keep it, or delete it")
        else:
            shutil.rmtree(path)
            notes.append(f"removed {path}: a temporary folder of a preparation of {out} (process {pid}) that was "
                         "killed")
    return notes


def _swap_into_place(built: Path, out: Path) -> None:
    """Rename the finished dataset to `out`; an old one is renamed aside first and deleted only after."""
    if not out.exists() or not any(out.iterdir()):
        os.replace(built, out)  # rename(2) replaces an empty directory atomically
        return
    old = _sibling(out, "old")
    os.replace(out, old)  # the old dataset stays whole until the new one is in place
    try:
        os.replace(built, out)
    except BaseException:
        os.replace(old, out)  # put the old one back
        raise
    shutil.rmtree(old)


def prepare(splits: dict[str, Iterable[str]], config: PrepareConfig, source: dict[str, Any]) -> PrepareStats:
    """Tokenize, pack and shard `splits` (split name -> documents) into `config.out` with its manifest.json.

    Built in a temporary sibling directory and renamed into place at the end (see the module docstring).
    """
    if "train" not in splits:
        raise ValueError(f"the source needs a 'train' split, got {sorted(splits)}")
    out = config.out
    tokenizer, source = start_output(config, source)
    stats = build_staged(out, lambda stage: _prepare_into(stage, splits, config, source, tokenizer))
    stats.manifest.location = str(out / "manifest.json")
    return stats


def start_output(config: PrepareConfig, source: dict[str, Any]) -> tuple[TokenizerInfo, dict[str, Any]]:
    """Before any work: check the output directory and load the tokenizer (a missing EOS fails here; GPT-2's rank
    file is fetched once, before any worker forks); the source record gains a tokenizer file's path."""
    check_output(config.out, config.overwrite)
    tok = get_tokenizer(config.tokenizer, config.eos_token)
    if is_tokenizer_file(config.tokenizer):
        source = {**source, "tokenizer_file": str(Path(config.tokenizer).resolve())}
    return TokenizerInfo(tok.name, tok.vocab_size, tok.eos_id, tok.sha256), source


def build_staged(out: Path, build: Callable[[Path], T]) -> T:
    """`build(stage)` in a new temporary sibling of `out`, renamed to `out` once it returns (module docstring)."""
    for note in remove_stale_siblings(out):
        print(note, file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = _sibling(out, "tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; the dataset gets the usual permissions
    try:
        result = build(stage)
        _swap_into_place(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # the half-built dataset; the error itself propagates
        raise
    return result


def _prepare_into(stage: Path, splits: dict[str, Iterable[str]], config: PrepareConfig, source: dict[str, Any],
                  tokenizer: TokenizerInfo) -> PrepareStats:
    dtype = dtype_for(tokenizer.vocab_size)
    seqs_per_sample = config.seqs_per_sample or default_seqs_per_sample(config.seq_len, DTYPES[dtype].itemsize)
    hold_out = "valid" not in splits and config.valid_fraction > 0
    every = round(1 / config.valid_fraction) if hold_out else 0
    names = list(splits) + (["valid"] if hold_out else [])
    seqs_per_shard = max(1, config.shard_tokens // config.seq_len)
    packers = {s: Packer(config.seq_len, np.dtype(dtype)) for s in names}
    writers = {s: ShardWriter(stage, s, config.seq_len, dtype, seqs_per_sample, seqs_per_shard) for s in names}
    docs = dict.fromkeys(names, 0)
    text_bytes = tokens = 0
    start = time.perf_counter()
    bar = tqdm(unit=" doc", disable=not config.progress, desc=f"tokenizing ({tokenizer.name})")
    for split, documents in splits.items():
        tasks = ((config.tokenizer, config.eos_token, chunk) for chunk in chunks(documents, config.chunk_docs))
        first_doc = 0
        for ids, lengths, nbytes in ordered_map(_encode_chunk, tasks, config.workers):
            text_bytes += nbytes
            n = len(lengths)
            tokens += len(ids)
            if hold_out and split == "train":
                held = (np.arange(first_doc, first_doc + n) % every) == every - 1
                mask = np.repeat(held, lengths)
                docs["valid"] += int(held.sum())
                docs["train"] += n - int(held.sum())
                writers["valid"].write(packers["valid"].add(ids[mask]))
                writers["train"].write(packers["train"].add(ids[~mask]))
            else:
                docs[split] += n
                writers[split].write(packers[split].add(ids))
            first_doc += n
            bar.update(n)
            bar.set_postfix(tokens=f"{tokens / 1e6:.1f}M", refresh=False)
    bar.close()
    out_splits = {}
    for s in names:
        dropped = packers[s].finish()
        shards = writers[s].close()
        n = packers[s].num_sequences
        out_splits[s] = SplitInfo(docs[s], n, n * config.seq_len, dropped, shards)
    manifest = Manifest(tokenizer, config.seq_len, dtype, seqs_per_sample, out_splits,
                        {**source, "eos": "appended to every document",
                         "remainder": "each split's final tokens that fill no whole sequence are dropped",
                         "valid": (f"every {every}th document held out" if hold_out else
                                   "the source's own split" if "valid" in splits else "none")})
    manifest.save(stage / "manifest.json")
    return PrepareStats(manifest, time.perf_counter() - start, sum(docs.values()), text_bytes, tokens)


def write_sequences(out: Path, splits: dict[str, np.ndarray], tokenizer: TokenizerInfo, seqs_per_sample: int,
                    seqs_per_shard: int, source: dict[str, Any] | None = None,
                    prompt_lengths: dict[str, np.ndarray] | None = None) -> Manifest:
    """Shard already-packed (n, seq_len) token arrays per split and write their manifest.json; with
    `prompt_lengths` (per split, (n,) in [0, seq_len)) the data is conditional: each row stores its prompt length."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seq_len = next(iter(splits.values())).shape[1]
    dtype = dtype_for(max(tokenizer.vocab_size, seq_len) if prompt_lengths is not None else tokenizer.vocab_size)
    if prompt_lengths is not None and set(prompt_lengths) != set(splits):
        raise ValueError(f"prompt_lengths has splits {sorted(prompt_lengths)}, the data {sorted(splits)}")
    out_splits = {}
    for name, seqs in splits.items():
        rows = seqs
        if prompt_lengths is not None:
            lengths = np.asarray(prompt_lengths[name])
            if lengths.shape != (len(seqs),) or ((lengths < 0) | (lengths >= seq_len)).any():
                raise ValueError(f"split {name!r}: prompt_lengths must be ({len(seqs)},) values in [0, {seq_len}): "
                                 "every sequence keeps at least one response position")
            rows = np.concatenate([seqs, lengths[:, None].astype(seqs.dtype)], axis=1)
        writer = ShardWriter(out, name, rows.shape[1], dtype, seqs_per_sample, seqs_per_shard)
        writer.write(rows)
        out_splits[name] = SplitInfo(len(seqs), len(seqs), seqs.size, 0, writer.close())
    manifest = Manifest(tokenizer, seq_len, dtype, seqs_per_sample, out_splits, source or {"packed": "given arrays"},
                        conditional=prompt_lengths is not None)
    manifest.save(out / "manifest.json")
    return manifest
