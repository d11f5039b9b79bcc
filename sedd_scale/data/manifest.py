"""The JSON manifest of a prepared token dataset: tokenizer, packing, and every split's shards.

    {"format": "sedd-scale-tokens", "version": 2,
     "tokenizer": {"name": "gpt2", "vocab_size": 50257, "eos_id": 50256, "sha256": "..."},
     "seq_len": 1024, "dtype": "uint16", "seqs_per_sample": 8, "source": {...},
     "splits": {"train": {"num_documents": ..., "num_sequences": ..., "num_tokens": ...,
                          "dropped_tokens": ..., "shards": [{"path": "train-000000.tar",
                          "num_sequences": ..., "num_bytes": ..., "sha256": "...",
                          "crc_path": "train-000000.crc32", "crc_sha256": "..."}]}, ...}}

A split may instead be read from a Megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`, see
`indexed.py`): its `shards` is empty and its `"indexed"` entry names the prefix (relative to the
manifest, or absolute), both files' sizes and sha256, the .bin's token dtype, the split's first
document, and whether an EOS is inserted after every document.

Shard paths are relative to the manifest's location: a local path, an http(s):// URL (joined as
URLs are), or a `pipe:` command naming `manifest.json` (the shard's path replaces that name, e.g.
`pipe:aws s3 cp s3://bucket/data/manifest.json -`). Tokens are little-endian `dtype`, laid out as
`layout.py` computes; the `.crc32` sidecar of a shard holds one little-endian CRC32 per sequence.
The tokenizer's sha256 identifies its file (GPT-2's rank file, a tokenizer.json; none for bytes).

Version 1 (no CRC sidecars, shards read whole) is refused: prepare the data again.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import numpy as np

from sedd_scale.data.tar_layout import ShardLayout
from sedd_scale.data.tokenizer import TOKENIZERS, tokenizer_identity
from sedd_scale.data.urlcache import UrlError, is_url, read_url

FORMAT, VERSION = "sedd-scale-tokens", 2
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_REPREPARE = "prepare the data again with tools/prepare_data.py (--overwrite replaces the old dataset)"


class ManifestError(ValueError):
    """A manifest that is malformed or does not match what the run expects."""


@dataclass(frozen=True)
class TokenizerInfo:
    """Which tokenizer produced the tokens: its name, vocabulary, end-of-document id and file sha256."""

    name: str
    vocab_size: int
    eos_id: int
    sha256: str | None = None

    def __post_init__(self):
        if not 0 <= self.eos_id < self.vocab_size:
            raise ManifestError(f"eos_id {self.eos_id} outside the vocabulary [0, {self.vocab_size})")

    def describe(self) -> str:
        """e.g. "gpt2 (vocabulary 50257, EOS 50256, sha256 306cd27f03c1)"."""
        sha = f", sha256 {self.sha256[:12]}" if self.sha256 else ""
        return f"{self.name} (vocabulary {self.vocab_size}, EOS {self.eos_id}{sha})"


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """One tar shard and its CRC32 sidecar: paths relative to the manifest, sequence count, size, sha256s."""

    path: str
    num_sequences: int
    num_bytes: int
    sha256: str
    crc_path: str
    crc_sha256: str

    @property
    def crc_bytes(self) -> int:
        """Size of the sidecar: one uint32 per sequence."""
        return 4 * self.num_sequences


@dataclass(frozen=True, slots=True)
class ShardRef:
    """A shard located: where its tar and sidecar are (paths or URLs), and its first sequence's split-wide index."""

    tar: str
    crc: str
    info: ShardInfo
    first: int


# Integer token dtypes Megatron's IndexedDataset writes (DType in megatron.core.datasets.indexed_dataset).
MEGATRON_DTYPES = ("uint8", "int8", "int16", "uint16", "int32", "int64")


@dataclass(frozen=True)
class IndexedInfo:
    """A split read from a Megatron indexed dataset (PREFIX.bin + PREFIX.idx) instead of tar shards.

    The split's documents are [first_document, first_document + num_documents) of the prefix (Megatron's
    documents, its document_indices), concatenated (with the tokenizer's EOS after each if insert_eos) and cut
    into seq_len rows; the tail that fills no whole row is dropped (the split's dropped_tokens).
    """

    prefix: str  # relative to the manifest's directory, or absolute; local (the .bin is memory-mapped)
    bin_bytes: int
    bin_sha256: str
    idx_bytes: int
    idx_sha256: str
    dtype: str  # the .bin's token dtype as Megatron wrote it (numpy name, e.g. uint16, int32)
    first_document: int
    insert_eos: bool

    def __post_init__(self):
        if self.dtype not in MEGATRON_DTYPES:
            raise ManifestError(f"indexed dtype {self.dtype!r} not one of {MEGATRON_DTYPES}")
        if self.first_document < 0 or self.bin_bytes < 0 or self.idx_bytes < 0:
            raise ManifestError("indexed first_document, bin_bytes and idx_bytes must be >= 0")
        if "://" in self.prefix or self.prefix.startswith("pipe:"):
            raise ManifestError(f"indexed prefix {self.prefix!r} is a URL: a Megatron indexed dataset is "
                                "memory-mapped, copy it to a local or network filesystem")


@dataclass
class SplitInfo:
    """One split (train/valid/test): counts, and its shards or its Megatron indexed dataset."""

    num_documents: int
    num_sequences: int
    num_tokens: int  # tokens in sequences = num_sequences * seq_len
    dropped_tokens: int  # the packing remainder: the split's last tokens that fill no whole sequence
    shards: list[ShardInfo] = field(default_factory=list)
    indexed: IndexedInfo | None = None  # set: the split is read from a Megatron indexed dataset, shards is empty

    def __post_init__(self):
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in self.shards]
        if isinstance(self.indexed, dict):
            self.indexed = IndexedInfo(**self.indexed)
        if self.indexed is not None:
            if self.shards:
                raise ManifestError("a split read from a Megatron indexed dataset has no shards")
        elif sum(s.num_sequences for s in self.shards) != self.num_sequences:
            raise ManifestError(f"shard sequence counts sum to {sum(s.num_sequences for s in self.shards)}, "
                                f"the split says {self.num_sequences}")


def is_current(path: str | Path) -> bool:
    """Whether a local `path` holds a manifest of this format version (False: missing, or to prepare again)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") == VERSION


def _relative(path: str) -> bool:
    return not (posixpath.isabs(path) or ".." in path.split("/") or "://" in path or path.startswith("pipe:"))


@dataclass
class Manifest:
    """A prepared dataset; `location` is where it was loaded from (shards are found relative to it)."""

    tokenizer: TokenizerInfo
    seq_len: int
    dtype: str
    seqs_per_sample: int
    splits: dict[str, SplitInfo]
    source: dict[str, Any] = field(default_factory=dict)
    # Prompt/response data (SFT): each stored row is seq_len tokens and then its prompt length P, so positions
    # [0, P) are the prompt (never noised, never scored) and the rest the response with its EOS padding.
    conditional: bool = False
    location: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if isinstance(self.tokenizer, dict):
            self.tokenizer = TokenizerInfo(**self.tokenizer)
        self.splits = {k: v if isinstance(v, SplitInfo) else SplitInfo(**v) for k, v in self.splits.items()}
        if self.seq_len < 1 or self.seqs_per_sample < 1:
            raise ManifestError(f"seq_len and seqs_per_sample must be >= 1, got {self.seq_len}, {self.seqs_per_sample}")
        if self.dtype not in DTYPES:
            raise ManifestError(f"dtype {self.dtype!r} not one of {sorted(DTYPES)}")
        if self.tokenizer.vocab_size - 1 > np.iinfo(DTYPES[self.dtype]).max:
            raise ManifestError(f"vocabulary {self.tokenizer.vocab_size} does not fit {self.dtype}")
        if self.conditional:
            if self.seq_len - 1 > np.iinfo(DTYPES[self.dtype]).max:
                raise ManifestError(f"prompt lengths up to seq_len={self.seq_len} do not fit {self.dtype}")
            if any(split.indexed is not None for split in self.splits.values()):
                raise ManifestError("conditional (prompt/response) data is stored in shards, not in a Megatron "
                                    "indexed dataset")
        layout = self.layout
        for name, split in self.splits.items():
            for i, s in enumerate(split.shards):
                if not (_relative(s.path) and _relative(s.crc_path)):
                    raise ManifestError(f"split {name!r}: shard paths must be relative to the manifest, got "
                                        f"{s.path!r}, {s.crc_path!r}")
                # The loader computes offsets from the layout: a shard another tool wrote must not be misread.
                if s.num_sequences < 1 or (i + 1 < len(split.shards) and s.num_sequences % self.seqs_per_sample):
                    raise ManifestError(f"shard {s.path} holds {s.num_sequences} sequences: every shard but a "
                                        f"split's last must hold a positive multiple of seqs_per_sample="
                                        f"{self.seqs_per_sample}")
                if s.num_bytes != layout.shard_bytes(s.num_sequences):
                    raise ManifestError(f"shard {s.path} is {s.num_bytes} bytes, not the "
                                        f"{layout.shard_bytes(s.num_sequences)} of the fixed tar layout of "
                                        f"{s.num_sequences} sequences: it was not written by prepare_data")

    @property
    def np_dtype(self) -> np.dtype:
        """The token dtype (little-endian)."""
        return DTYPES[self.dtype]

    @property
    def layout(self) -> ShardLayout:
        """Where each sequence's bytes are in a shard (a conditional row carries its prompt length as well)."""
        return ShardLayout(self.row_width, DTYPES[self.dtype].itemsize, self.seqs_per_sample)

    @property
    def row_width(self) -> int:
        """Stored ids per row: seq_len tokens, plus the prompt length of conditional data."""
        return self.seq_len + self.conditional

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON-ready data."""
        d = asdict(self)
        d.pop("location")
        if not d["conditional"]:  # absent, not false: the fingerprints of existing datasets stay as they were
            del d["conditional"]
        for split in d["splits"].values():  # absent, not null: the fingerprints of shard datasets stay as they were
            if split["indexed"] is None:
                del split["indexed"]
        return {"format": FORMAT, "version": VERSION, **d}

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: identifies the dataset's content (shards' sha256 included).

        An indexed split counts by its files' sha256, not its prefix: the files may move (the manifest prepared
        again for the new place) and a run still resumes on them.
        """
        data = self.to_json()
        for split in data["splits"].values():
            if "indexed" in split:
                split["indexed"] = {k: v for k, v in split["indexed"].items() if k != "prefix"}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        """Write the manifest as JSON (atomically)."""
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        self.location = str(path)

    @classmethod
    def load(cls, location: str | Path) -> Manifest:
        """Read and validate a manifest from a path or URL; errors name it."""
        location = str(location)
        if is_url(location):
            if location.startswith("pipe:") and "manifest.json" not in location:
                raise ManifestError(f"the pipe: manifest {location!r} does not name manifest.json: its shards are "
                                    "found by replacing that name, e.g. "
                                    "pipe:aws s3 cp s3://bucket/data/manifest.json -")
            try:
                text = read_url(location).decode("utf-8")
            except UrlError as e:
                raise ManifestError(str(e)) from e
        else:
            if not os.path.isfile(location):
                raise ManifestError(f"manifest {location} does not exist: prepare the data with "
                                    "`python tools/prepare_data.py ... --out DIR` (it writes DIR/manifest.json)")
            text = Path(location).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest {location} is not valid JSON: {e}") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestError(f"{location} is not a {FORMAT} manifest")
        if data.get("version") != VERSION:
            raise ManifestError(f"manifest {location} is {FORMAT} version {data.get('version')!r}; this code reads "
                                f"version {VERSION} (fixed tar layout, a CRC32 per sequence, read by byte range): "
                                f"{_REPREPARE}")
        try:
            return cls(**{k: v for k, v in data.items() if k not in ("format", "version")}, location=location)
        except (TypeError, ManifestError) as e:
            raise ManifestError(f"manifest {location} is invalid: {e}") from e

    def split(self, name: str) -> SplitInfo:
        """The split `name`; an error lists the available ones."""
        if name not in self.splits:
            raise ManifestError(f"manifest {self.location} has no split {name!r} (it has {sorted(self.splits)})")
        return self.splits[name]

    def locate(self, relative: str) -> str:
        """Path or URL of a file the manifest names (relative to the manifest's location)."""
        base = self.location if self.location is not None else "manifest.json"
        if base.startswith("pipe:"):
            head, _, tail = base.rpartition("manifest.json")
            return head + relative + tail
        if is_url(base):
            return urljoin(base, relative)
        return os.path.join(os.path.dirname(base), relative)

    def shard_refs(self, split: str) -> list[ShardRef]:
        """Every shard of a split, located, in order."""
        refs, first = [], 0
        for s in self.split(split).shards:
            refs.append(ShardRef(self.locate(s.path), self.locate(s.crc_path), s, first))
            first += s.num_sequences
        return refs

    def indexed_prefix(self, split: str) -> str | None:
        """The located prefix of a split read from a Megatron indexed dataset (None: the split has shards)."""
        info = self.split(split).indexed
        if info is None:
            return None
        return info.prefix if os.path.isabs(info.prefix) else self.locate(info.prefix)

    def check_compatible(self, vocab_size: int, seq_len: int, tokenizer: str | None = None) -> None:
        """Refuse a run whose vocabulary (model.num_tokens), sequence length or tokenizer differs from this data's.

        `tokenizer` is the recipe's data.tokenizer (gpt2, byte or a tokenizer.json path); None skips that check.
        """
        t = self.tokenizer
        if vocab_size != t.vocab_size:
            raise ManifestError(
                f"manifest {self.location} holds {t.describe()} tokens but the recipe's tokenizer vocabulary is "
                f"{vocab_size} (model.num_tokens): prepare the data with the recipe's tokenizer or set "
                f"model.num_tokens: {t.vocab_size}")
        if seq_len != self.seq_len:
            raise ManifestError(
                f"manifest {self.location} was packed into sequences of {self.seq_len} tokens but the recipe trains "
                f"on {seq_len}: re-run tools/prepare_data.py with --seq-len {seq_len} or set "
                f"data.seq_len={self.seq_len}")
        if tokenizer is not None:
            name, sha = tokenizer_identity(tokenizer)
            same = t.name == name if tokenizer in TOKENIZERS else t.sha256 == sha  # a file: by its content
            if not same:
                raise ManifestError(
                    f"manifest {self.location} holds {t.describe()} tokens but the recipe's data.tokenizer is "
                    f"{tokenizer} ({name}{f', sha256 {sha[:12]}' if sha else ''}): prepare the data with that "
                    "tokenizer, or point data.tokenizer at the one the data was prepared with")
