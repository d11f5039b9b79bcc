"""The JSON manifest of a prepared token dataset: tokenizer, packing, and every split's shards.

    {"format": "sedd-scale-tokens", "version": 1,
     "tokenizer": {"name": "gpt2", "vocab_size": 50257, "eos_id": 50256},
     "seq_len": 1024, "dtype": "uint16", "seqs_per_sample": 64, "source": {...},
     "splits": {"train": {"num_documents": ..., "num_sequences": ..., "num_tokens": ...,
                          "dropped_tokens": ..., "shards": [{"path": "train-000000.tar",
                          "num_sequences": ..., "num_bytes": ..., "sha256": "..."}]}, ...}}

Shard paths are relative to the manifest's directory. Tokens are little-endian `dtype`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT, VERSION = "sedd-scale-tokens", 1
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class ManifestError(ValueError):
    """A manifest that is malformed or does not match what the run expects."""


@dataclass(frozen=True)
class TokenizerInfo:
    """Which tokenizer produced the tokens."""

    name: str
    vocab_size: int
    eos_id: int

    def __post_init__(self):
        if not 0 <= self.eos_id < self.vocab_size:
            raise ManifestError(f"eos_id {self.eos_id} outside the vocabulary [0, {self.vocab_size})")


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: path relative to the manifest, sequence count, size and sha256."""

    path: str
    num_sequences: int
    num_bytes: int
    sha256: str


@dataclass
class SplitInfo:
    """One split (train/valid/test): counts and shards."""

    num_documents: int
    num_sequences: int
    num_tokens: int  # tokens in sequences = num_sequences * seq_len
    dropped_tokens: int  # the packing remainder: the split's last tokens that fill no whole sequence
    shards: list[ShardInfo] = field(default_factory=list)

    def __post_init__(self):
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in self.shards]
        if sum(s.num_sequences for s in self.shards) != self.num_sequences:
            raise ManifestError(f"shard sequence counts sum to {sum(s.num_sequences for s in self.shards)}, "
                                f"the split says {self.num_sequences}")


@dataclass
class Manifest:
    """A prepared dataset; `path` is where it was loaded from (shards are found next to it)."""

    tokenizer: TokenizerInfo
    seq_len: int
    dtype: str
    seqs_per_sample: int
    splits: dict[str, SplitInfo]
    source: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)

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

    @property
    def np_dtype(self) -> np.dtype:
        """The token dtype (little-endian)."""
        return DTYPES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON-ready data."""
        d = asdict(self)
        d.pop("path")
        return {"format": FORMAT, "version": VERSION, **d}

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: identifies the dataset's content (shards' sha256 included)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        """Write the manifest as JSON (atomically)."""
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read and validate a manifest; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"manifest {path} does not exist: prepare the data with "
                                "`python tools/prepare_data.py ... --out DIR` (it writes DIR/manifest.json)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest {path} is not valid JSON: {e}") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ManifestError(f"{path} is not a {FORMAT} v{VERSION} manifest (format={data.get('format')!r}, "
                                f"version={data.get('version')!r})" if isinstance(data, dict) else
                                f"{path} is not a {FORMAT} manifest")
        try:
            return cls(**{k: v for k, v in data.items() if k not in ("format", "version")}, path=path)
        except (TypeError, ManifestError) as e:
            raise ManifestError(f"manifest {path} is invalid: {e}") from e

    def split(self, name: str) -> SplitInfo:
        """The split `name`; an error lists the available ones."""
        if name not in self.splits:
            raise ManifestError(f"manifest {self.path} has no split {name!r} (it has {sorted(self.splits)})")
        return self.splits[name]

    def shard_path(self, shard: ShardInfo) -> Path:
        """Absolute path of a shard (relative to the manifest's directory)."""
        base = self.path.parent if self.path is not None else Path(".")
        return base / shard.path

    def check_compatible(self, vocab_size: int, seq_len: int) -> None:
        """Refuse a recipe whose tokenizer vocabulary or sequence length differs from this data's."""
        if vocab_size != self.tokenizer.vocab_size:
            raise ManifestError(
                f"manifest {self.path} holds {self.tokenizer.name} tokens (vocabulary {self.tokenizer.vocab_size}) "
                f"but the recipe's tokenizer vocabulary is {vocab_size}: prepare the data with the recipe's "
                "tokenizer or change the recipe's data.tokenizer")
        if seq_len != self.seq_len:
            raise ManifestError(
                f"manifest {self.path} was packed into sequences of {self.seq_len} tokens but the recipe trains "
                f"on {seq_len}: re-run tools/prepare_data.py with --seq-len {seq_len} or set "
                f"data.seq_len={self.seq_len}")
