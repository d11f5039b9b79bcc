"""Megatron indexed datasets (PREFIX.bin + PREFIX.idx) as a data source beside the tar shards.

Megatron-LM's and GPT-NeoX's `tools/preprocess_data.py` write a corpus once as
`megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder` files: the .bin holds every document's token
ids back to back, the .idx their lengths, byte offsets and document boundaries. `prepare_megatron`
(`tools/prepare_data.py --from-megatron PREFIX`) reads them once and writes a small manifest.json whose
splits point at the prefix (`manifest.IndexedInfo`) instead of listing shards: nothing is tokenized again
and no token is copied.

A split's stream is its documents concatenated, with the tokenizer's EOS after each when `insert_eos`
(Megatron appends its EOD itself only with `--append-eod`; preparation checks which is the case and
refuses the wrong choice), cut into rows of seq_len tokens; the tail that fills no whole row is dropped
and counted. Row r is stream tokens [r*seq_len, (r+1)*seq_len): the same "sequence index" the loader's
global shuffle, blending, DP split and resume already address for shards, so those guarantees carry over
unchanged. Without `--valid-prefix`, the last documents (`--valid-fraction` of them) form the valid split.

Reading goes through megatron-core's `IndexedDataset` (mmap=True): its .bin reader maps the file and
`read(dtype, count, offset)` returns a view, so a row touches only its own pages; the mapping is advised
MADV_RANDOM so that the kernel reads no ahead around each row (the same as the shard reader's
POSIX_FADV_RANDOM). With an EOS inserted, a row's first document is found by a binary search over the
.idx's (memory-mapped) offsets: O(log documents) entries read, nothing built per document at start.
Integrity: both files' sizes are checked at start (`check_split`), their sha256 by preparation and
`prepare_data --verify`; every row read is checked to hold ids inside the vocabulary (the format has no
per-row checksum).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sedd_scale.data.manifest import IndexedInfo, Manifest, ManifestError, SplitInfo, TokenizerInfo
from sedd_scale.data.shards import ShardError, file_problem
from sedd_scale.data.tar_layout import default_seqs_per_sample
from sedd_scale.data.urlcache import is_url

_CHUNK = 1 << 26  # bytes per read while hashing and scanning a .bin at preparation
_FIX = ("restore PREFIX.bin and PREFIX.idx as they were prepared (`python tools/prepare_data.py --verify MANIFEST` "
        "checks them), or run `tools/prepare_data.py --from-megatron PREFIX` again for data tokenized anew (a run "
        "resumes only on the data it started with: that needs a new checkpoint.dir)")


def _open_dataset(prefix: str, fix: str):
    """megatron-core's IndexedDataset of `prefix`, memory-mapped; files it cannot read are a ShardError naming them."""
    import sedd_scale.compat  # noqa: F401  (before megatron-core)

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        return IndexedDataset(prefix, mmap=True)
    except (AssertionError, OSError, ValueError, struct.error) as e:  # megatron checks its header by assert
        raise ShardError(f"Megatron indexed dataset {prefix}.idx / {prefix}.bin cannot be read ({e!r}): {fix}") from e


def _document_tokens(ds, docs: np.ndarray, total_tokens: int) -> np.ndarray:
    """The .bin token offset at which each document of `docs` starts (total_tokens for the end, docs = count)."""
    seq = np.asarray(ds.document_indices[np.asarray(docs, dtype=np.int64)], dtype=np.int64)
    pointers = ds.index.sequence_pointers  # memory-mapped: indexing reads just these entries
    out = np.full(seq.shape, total_tokens, dtype=np.int64)
    inside = seq < len(pointers)
    out[inside] = pointers[seq[inside]] // ds.index.dtype_size
    return out


@dataclass(frozen=True)
class IndexedRef:
    """A split of a Megatron indexed dataset, located: what a rank needs to read its rows."""

    prefix: str  # located: PREFIX.bin, PREFIX.idx
    info: IndexedInfo
    num_documents: int
    num_sequences: int
    seq_len: int
    eos_id: int
    vocab_size: int

    @classmethod
    def of(cls, manifest: Manifest, split: str) -> IndexedRef:
        """The indexed split `split` of `manifest`, located relative to it."""
        s = manifest.split(split)
        t = manifest.tokenizer
        return cls(manifest.indexed_prefix(split), s.indexed, s.num_documents, s.num_sequences, manifest.seq_len,
                   t.eos_id, t.vocab_size)

    @property
    def files(self) -> tuple[tuple[str, int, str], tuple[str, int, str]]:
        """(path, bytes, sha256) of the .bin and the .idx."""
        i = self.info
        return (self.prefix + ".bin", i.bin_bytes, i.bin_sha256), (self.prefix + ".idx", i.idx_bytes, i.idx_sha256)


def indexed_problem(ref: IndexedRef, fix: str | None = None) -> str | None:
    """Why a split's .bin / .idx cannot be read (a URL, missing, or not the size the manifest says), or None."""
    fix = fix or _FIX.replace("PREFIX", ref.prefix)
    if is_url(ref.prefix):
        return (f"Megatron indexed dataset {ref.prefix} is a URL (the manifest was loaded from one?): its .bin is "
                "memory-mapped, so it must be a local file; copy the manifest and the dataset to a filesystem")
    problems = (file_problem(str(path), size, "Megatron indexed dataset file", fix) for path, size, _ in ref.files)
    return next((p for p in problems if p is not None), None)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def verify_indexed(ref: IndexedRef) -> str | None:
    """None if a split's .bin and .idx are intact (sizes and sha256 as prepared), else what is wrong."""
    problem = indexed_problem(ref, "restore it from a copy, or prepare the data again")
    if problem:
        return problem
    for path, _, sha in ref.files:
        got = _sha256(path)
        if got != sha:
            return (f"sha256 mismatch for Megatron indexed dataset file {path}: expected {sha}, got {got}: it changed "
                    "since it was prepared; restore it from a copy, or prepare the data again")
    return None


class IndexedRows:
    """Reads rows of an indexed split through megatron-core's IndexedDataset (mmap), ids checked against the vocab."""

    def __init__(self, ref: IndexedRef):
        self.ref = ref
        self._ds = None

    def __getstate__(self):  # a copy (a DataLoader worker) maps the files itself
        return {**self.__dict__, "_ds": None}

    def _open(self):
        if self._ds is not None:
            return self._ds
        ref, info = self.ref, self.ref.info
        problem = indexed_problem(ref)
        if problem:  # checked at start too: this is a file that went away or changed during the run
            raise ShardError(problem)
        ds = _open_dataset(ref.prefix, _FIX.replace('PREFIX', ref.prefix))
        dtype, documents = np.dtype(ds.index.dtype).name, len(ds.document_indices) - 1
        if dtype != info.dtype or documents < info.first_document + ref.num_documents:
            raise ShardError(f"Megatron indexed dataset {ref.prefix}.idx holds {dtype} tokens in {documents} "
                             f"documents, the manifest says {info.dtype} and at least "
                             f"{info.first_document + ref.num_documents}: {_FIX.replace('PREFIX', ref.prefix)}")
        # megatron maps the whole .bin; without this the kernel reads ahead (128 KiB or more) around each few-KiB row
        mapped = getattr(getattr(ds.bin_reader, "_bin_buffer_mmap", None), "_mmap", None)
        if mapped is not None and hasattr(mmap, "MADV_RANDOM"):
            mapped.madvise(mmap.MADV_RANDOM)
        self._total_tokens = info.bin_bytes // ds.index.dtype_size
        self._first = int(_document_tokens(ds, np.array([info.first_document]), self._total_tokens)[0])
        self._ds = ds
        return ds

    def _starts(self, k: np.ndarray) -> np.ndarray:
        """Stream offset of the split's documents k (k = num_documents: the stream's end)."""
        tokens = _document_tokens(self._ds, self.ref.info.first_document + k, self._total_tokens)
        return tokens - self._first + (k if self.ref.info.insert_eos else 0)

    def _bin(self, first_token: int, count: int) -> np.ndarray:
        ds = self._ds
        return ds.bin_reader.read(dtype=ds.index.dtype, count=count, offset=first_token * ds.index.dtype_size)

    def _row_with_eos(self, start: int, k: int) -> np.ndarray:
        """The row at stream offset `start`, which lies in document k (documents followed by EOS)."""
        length, eos = self.ref.seq_len, self.ref.eos_id
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            doc_start, doc_end = (int(x) for x in self._starts(np.array([k, k + 1])))
            doc_tokens = doc_end - 1 - doc_start  # the document's own tokens; its EOS at doc_end - 1
            at = start + filled - doc_start  # where in this document (tokens, then its EOS) the row continues
            take = min(doc_tokens - at, length - filled)
            if take > 0:
                first = self._first + doc_start - k + at  # the .bin position: k EOS tokens before doc k are not in it
                out[filled:filled + take] = self._bin(first, take)
                filled += take
            if filled < length:
                out[filled] = eos
                filled += 1
            k += 1
        return out

    def _documents_at(self, starts: np.ndarray) -> np.ndarray:
        """The split's document holding each stream offset: binary search over the .idx's memory-mapped offsets."""
        lo = np.zeros(len(starts), dtype=np.int64)
        hi = np.full(len(starts), self.ref.num_documents, dtype=np.int64)  # _starts(hi) > every offset
        while (hi - lo > 1).any():
            mid = (lo + hi) // 2
            below = self._starts(mid) <= starts
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        return lo

    def read(self, seqs: np.ndarray) -> np.ndarray:
        """Rows `seqs` of the split, in that order: (len(seqs), seq_len) int64."""
        self._open()
        ref, length = self.ref, self.ref.seq_len
        seqs = np.asarray(seqs, dtype=np.int64)
        out = np.empty((len(seqs), length), dtype=np.int64)
        if seqs.size == 0:
            return out
        if seqs.min() < 0 or seqs.max() >= ref.num_sequences:
            raise ValueError(f"rows outside [0, {ref.num_sequences}) of {ref.prefix}")
        if ref.info.insert_eos:
            docs = self._documents_at(seqs * length)
            for i, (row, k) in enumerate(zip(seqs.tolist(), docs.tolist())):
                out[i] = self._row_with_eos(row * length, k)
        else:  # the stream is the .bin itself from the split's first token: one read per run of consecutive rows
            order = np.argsort(seqs, kind="stable")
            ordered = seqs[order]
            for run in np.split(np.arange(len(ordered)), np.flatnonzero(np.diff(ordered) != 1) + 1):
                tokens = self._bin(self._first + int(ordered[run[0]]) * length, len(run) * length)
                out[order[run]] = tokens.reshape(len(run), length)
        bad = (out < 0) | (out >= ref.vocab_size)
        if bad.any():
            i, j = (int(x) for x in np.argwhere(bad)[0])
            raise ShardError(f"row {int(seqs[i])} of Megatron indexed dataset {ref.prefix}.bin holds token id "
                             f"{int(out[i, j])}, outside the vocabulary [0, {ref.vocab_size}): the file changed since "
                             f"it was prepared; {_FIX.replace('PREFIX', ref.prefix)}")
        return out


# ---- preparation: read the files once, write the manifest -----------------------------------------------------


@dataclass
class _Scanned:
    """One prefix, read whole once: identity and what its documents give."""

    prefix: str
    ds: Any
    dtype: str
    bin_bytes: int
    bin_sha256: str
    idx_bytes: int
    idx_sha256: str
    num_documents: int
    total_tokens: int

    def tokens(self, docs: list[int]) -> list[int]:
        """The .bin token offset of each document's start (num_documents: the end)."""
        return [int(x) for x in _document_tokens(self.ds, np.array(docs), self.total_tokens)]


def _check_contiguous(ds, prefix: str, bin_bytes: int) -> None:
    """Refuse an .idx whose sequences are not back to back in the .bin (the stream reads the .bin as one)."""
    lengths, pointers, size = ds.sequence_lengths, ds.index.sequence_pointers, ds.index.dtype_size
    offset = 0
    for a in range(0, len(lengths), 1 << 22):
        chunk = np.asarray(lengths[a:a + (1 << 22)], dtype=np.int64)
        expected = offset + np.concatenate([[0], np.cumsum(chunk)[:-1]]) * size
        if not np.array_equal(np.asarray(pointers[a:a + len(chunk)]), expected):
            raise ManifestError(f"{prefix}.idx: sequences are not stored back to back in {prefix}.bin (as "
                                "IndexedDatasetBuilder writes them): rebuild the dataset with Megatron's "
                                "preprocess_data or merge_datasets")
        offset += int(chunk.sum()) * size
    if offset != bin_bytes:
        raise ManifestError(f"{prefix}.bin is {bin_bytes} bytes but {prefix}.idx describes {offset}: the pair does "
                            "not belong together or the .bin is truncated; rebuild it with Megatron's preprocess_data")


def _scan(prefix: str, tokenizer: TokenizerInfo) -> _Scanned:
    """Open a prefix with megatron-core, check it fits the tokenizer and the reader, hash both files."""
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise ManifestError(f"{prefix}{suffix} does not exist: --from-megatron / --valid-prefix take the PREFIX "
                                "of PREFIX.bin and PREFIX.idx as Megatron's preprocess_data wrote them (e.g. "
                                "data/corpus_text_document)")
    ds = _open_dataset(prefix, "write them again with Megatron's tools/preprocess_data.py")
    dtype = np.dtype(ds.index.dtype)
    if dtype.kind not in "iu":
        raise ManifestError(f"{prefix}.bin holds {dtype.name} values, not token ids")
    bin_bytes = os.path.getsize(prefix + ".bin")
    _check_contiguous(ds, prefix, bin_bytes)
    num_documents = len(ds.document_indices) - 1
    if num_documents < 1 or bin_bytes == 0:
        raise ManifestError(f"Megatron indexed dataset {prefix} holds no tokens")
    h, low, high = hashlib.sha256(), None, None
    with open(prefix + ".bin", "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            ids = np.frombuffer(block, dtype=dtype)
            low = int(ids.min()) if low is None else min(low, int(ids.min()))
            high = int(ids.max()) if high is None else max(high, int(ids.max()))
    if low < 0 or high >= tokenizer.vocab_size:
        bad = high if high >= tokenizer.vocab_size else low
        raise ManifestError(f"{prefix}.bin holds token id {bad}, outside the vocabulary [0, {tokenizer.vocab_size}) "
                            f"of {tokenizer.describe()}: it was tokenized with another tokenizer; pass --tokenizer "
                            "(and --eos-token) naming the one Megatron's preprocess_data used, and set "
                            "model.num_tokens to its vocabulary")
    return _Scanned(prefix, ds, dtype.name, bin_bytes, h.hexdigest(), os.path.getsize(prefix + ".idx"),
                    _sha256(prefix + ".idx"), num_documents, bin_bytes // dtype.itemsize)


def _check_eos(scan: _Scanned, eos_id: int, insert_eos: bool) -> None:
    """Refuse an EOS policy the documents contradict: they must end with EOS unless it is inserted, and not both."""
    ends_with_eos = 0
    data = np.memmap(scan.prefix + ".bin", dtype=scan.dtype, mode="r")
    for a in range(0, scan.num_documents, 1 << 22):
        docs = np.arange(a, min(a + (1 << 22), scan.num_documents) + 1)
        bounds = _document_tokens(scan.ds, docs, scan.total_tokens)
        ends = bounds[1:][bounds[1:] > bounds[:-1]] - 1  # the last token of each non-empty document
        ends_with_eos += int((np.asarray(data[ends]) == eos_id).sum())
    del data
    n = scan.num_documents
    if insert_eos and ends_with_eos == n:
        raise ManifestError(f"every document of {scan.prefix}.bin already ends with the EOS id {eos_id} (Megatron's "
                            "preprocess_data ran with --append-eod): drop --insert-eos, or each would end with two")
    if not insert_eos and ends_with_eos < n:
        raise ManifestError(f"{n - ends_with_eos} of the {n} documents of {scan.prefix}.bin do not end with the EOS id "
                            f"{eos_id} (Megatron's preprocess_data appends its EOD only with --append-eod): pass "
                            "--insert-eos to insert an EOS after every document, or --tokenizer / --eos-token naming "
                            "the tokenizer (and end-of-document token) the data was tokenized with")


def _split(scan: _Scanned, first: int, end: int, seq_len: int, insert_eos: bool) -> SplitInfo:
    """Documents [first, end) of a scanned prefix as a split: its stream cut into seq_len rows, the tail counted."""
    a, b = scan.tokens([first, end])
    tokens = b - a + (end - first if insert_eos else 0)
    n = tokens // seq_len
    info = IndexedInfo(os.path.abspath(scan.prefix), scan.bin_bytes, scan.bin_sha256, scan.idx_bytes,
                       scan.idx_sha256, scan.dtype, first, insert_eos)
    return SplitInfo(end - first, n, n * seq_len, tokens - n * seq_len, [], info)


def prepare_megatron(prefix: str, out: str | Path, tokenizer: TokenizerInfo, seq_len: int, *,
                     valid_prefix: str | None = None, valid_fraction: float = 0.01, insert_eos: bool = False,
                     seqs_per_sample: int = 0, overwrite: bool = False, source: dict[str, Any] | None = None
                     ) -> Manifest:
    """Write `out`/manifest.json for the Megatron indexed dataset `prefix` (train) and `valid_prefix` (valid; else the
    last `valid_fraction` of the documents), after checking both files against `tokenizer` (module docstring)."""
    from sedd_scale.data.prepare import build_staged, check_output, dtype_for

    out = Path(out)
    if seq_len < 1 or seqs_per_sample < 0 or not 0.0 <= valid_fraction < 0.5:
        raise ValueError(f"need seq_len >= 1, seqs_per_sample >= 0 and valid_fraction in [0, 0.5), got {seq_len}, "
                         f"{seqs_per_sample}, {valid_fraction}")
    check_output(out, overwrite)
    train = _scan(prefix, tokenizer)
    _check_eos(train, tokenizer.eos_id, insert_eos)
    splits: dict[str, SplitInfo]
    if valid_prefix is not None:
        valid = _scan(valid_prefix, tokenizer)
        _check_eos(valid, tokenizer.eos_id, insert_eos)
        splits = {"train": _split(train, 0, train.num_documents, seq_len, insert_eos),
                  "valid": _split(valid, 0, valid.num_documents, seq_len, insert_eos)}
        held_out = f"the documents of {os.path.abspath(valid_prefix)}"
    elif valid_fraction > 0:
        n_valid = max(1, round(valid_fraction * train.num_documents))
        cut = train.num_documents - n_valid
        if cut < 1:
            raise ManifestError(f"{prefix} holds {train.num_documents} document(s): too few to hold out "
                                f"--valid-fraction {valid_fraction} for validation; pass --valid-prefix or "
                                "--valid-fraction 0")
        splits = {"train": _split(train, 0, cut, seq_len, insert_eos),
                  "valid": _split(train, cut, train.num_documents, seq_len, insert_eos)}
        held_out = f"the last {n_valid} of the {train.num_documents} documents"
    else:
        splits = {"train": _split(train, 0, train.num_documents, seq_len, insert_eos)}
        held_out = "none"
    if splits["train"].num_sequences == 0:
        raise ManifestError(f"{prefix} holds fewer than {seq_len} tokens for training: pass a shorter --seq-len")
    block = seqs_per_sample or default_seqs_per_sample(seq_len, np.dtype(train.dtype).itemsize)
    manifest = Manifest(tokenizer, seq_len, dtype_for(tokenizer.vocab_size), block, splits, {
        **(source or {}), "megatron": "indexed dataset read in place (megatron-core's IndexedDataset)",
        "eos": ("inserted after every document" if insert_eos else "every document ends with it (--append-eod)"),
        "remainder": "each split's final tokens that fill no whole sequence are dropped", "valid": held_out})

    def write(stage: Path) -> Manifest:
        manifest.save(stage / "manifest.json")
        return manifest

    build_staged(out, write)
    manifest.location = str(out / "manifest.json")
    return manifest
