"""Prepare a token dataset: tokenize documents in parallel, pack them, write shards and a manifest.

The library half of `tools/prepare_data.py`. Documents are tokenized in chunks by a process
pool (results consumed in order, so output bytes do not depend on the worker count), packed per
split (`packing.py`) and written as shards (`shards.py`). When the source has no "valid" split,
every k-th document (k = round(1 / valid_fraction)) is held out for validation: a split by
documents, spread evenly over the corpus.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from sedd_scale.data.manifest import Manifest, SplitInfo, TokenizerInfo
from sedd_scale.data.packing import Packer
from sedd_scale.data.shards import ShardWriter
from sedd_scale.data.tokenizer import get_tokenizer


@dataclass
class PrepareConfig:
    """How to tokenize, pack and shard."""

    out: Path
    tokenizer: str = "gpt2"
    seq_len: int = 1024
    valid_fraction: float = 0.01  # documents held out when the source has no "valid" split; 0: none
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    seqs_per_sample: int = 0  # 0: about 64K tokens per sample
    shard_tokens: int = 1 << 24  # about 32 MiB of uint16 tokens per shard
    chunk_docs: int = 256  # documents per tokenization task
    progress: bool = True

    def __post_init__(self):
        self.out = Path(self.out)
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.valid_fraction < 0.5:
            raise ValueError(f"valid_fraction must be in [0, 0.5), got {self.valid_fraction}")
        if self.workers < 1 or self.chunk_docs < 1 or self.shard_tokens < 1 or self.seqs_per_sample < 0:
            raise ValueError("workers, chunk_docs and shard_tokens must be >= 1 and seqs_per_sample >= 0")
        if self.seqs_per_sample == 0:
            self.seqs_per_sample = max(1, (1 << 16) // self.seq_len)


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


def _encode_chunk(task: tuple[str, list[str]]) -> tuple[np.ndarray, np.ndarray, int]:
    name, texts = task
    ids, lengths = get_tokenizer(name).encode_documents(texts)
    return ids, lengths, sum(len(t.encode("utf-8")) for t in texts)


def _ordered_map(fn: Callable, tasks: Iterable, workers: int) -> Iterator:
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


def _chunks(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(docs)
    while chunk := list(islice(it, size)):
        yield chunk


def prepare(splits: dict[str, Iterable[str]], config: PrepareConfig, source: dict[str, Any]) -> PrepareStats:
    """Tokenize, pack and shard `splits` (split name -> documents) into `config.out`; write manifest.json."""
    if "train" not in splits:
        raise ValueError(f"the source needs a 'train' split, got {sorted(splits)}")
    tok = get_tokenizer(config.tokenizer)  # also fetches GPT-2's rank file once, before any fork
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    config.out.mkdir(parents=True, exist_ok=True)
    hold_out = "valid" not in splits and config.valid_fraction > 0
    every = round(1 / config.valid_fraction) if hold_out else 0
    names = list(splits) + (["valid"] if hold_out else [])
    seqs_per_shard = max(1, config.shard_tokens // config.seq_len)
    packers = {s: Packer(config.seq_len, np.dtype(dtype)) for s in names}
    writers = {s: ShardWriter(config.out, s, config.seq_len, dtype, config.seqs_per_sample, seqs_per_shard)
               for s in names}
    docs = dict.fromkeys(names, 0)
    text_bytes = tokens = 0
    start = time.perf_counter()
    bar = tqdm(unit=" doc", disable=not config.progress, desc=f"tokenizing ({config.tokenizer})")
    for split, documents in splits.items():
        tasks = ((config.tokenizer, chunk) for chunk in _chunks(documents, config.chunk_docs))
        first_doc = 0
        for ids, lengths, nbytes in _ordered_map(_encode_chunk, tasks, config.workers):
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
    manifest = Manifest(TokenizerInfo(tok.name, tok.vocab_size, tok.eos_id), config.seq_len, dtype,
                        config.seqs_per_sample, out_splits,
                        {**source, "eos": "appended to every document",
                         "remainder": "each split's final tokens that fill no whole sequence are dropped",
                         "valid": (f"every {every}th document held out" if hold_out else
                                   "the source's own split" if "valid" in splits else "none")})
    manifest.save(config.out / "manifest.json")
    return PrepareStats(manifest, time.perf_counter() - start, sum(docs.values()), text_bytes, tokens)


def write_sequences(out: Path, splits: dict[str, np.ndarray], tokenizer: TokenizerInfo, seqs_per_sample: int,
                    seqs_per_shard: int, source: dict[str, Any] | None = None) -> Manifest:
    """Shard already-packed (n, seq_len) token arrays per split and write their manifest.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seq_len = next(iter(splits.values())).shape[1]
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    out_splits = {}
    for name, seqs in splits.items():
        writer = ShardWriter(out, name, seq_len, dtype, seqs_per_sample, seqs_per_shard)
        writer.write(seqs)
        out_splits[name] = SplitInfo(len(seqs), len(seqs), seqs.size, 0, writer.close())
    manifest = Manifest(tokenizer, seq_len, dtype, seqs_per_sample, out_splits, source or {"packed": "given arrays"})
    manifest.save(out / "manifest.json")
    return manifest
