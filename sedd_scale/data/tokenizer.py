"""Tokenizers: GPT-2 BPE (the SEDD paper's, through tiktoken) and raw UTF-8 bytes for tiny CPU runs.

tiktoken normally downloads GPT-2's rank file from a host these machines cannot reach. The
identical file ships in the openai-whisper sdist on PyPI: it is fetched once with pip, checked
by sha256 and cached as `$SEDD_CACHE/tokenizers/gpt2.tiktoken`. Placing that file there by
hand (same sha256) works fully offline.
"""
from __future__ import annotations

import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from sedd_scale.data.fetch import cache_dir, fetch_package, sha256_bytes

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_WHISPER = ("openai-whisper==20250625", "openai_whisper-20250625.tar.gz",
            "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
            "openai_whisper-20250625/whisper/assets/gpt2.tiktoken")


class Tokenizer(Protocol):
    """What packing needs from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]: ...


def _join_with_eos(pieces: list[np.ndarray], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(p) + 1 for p in pieces), dtype=np.int64, count=len(pieces))
    out = np.full(int(lengths.sum()), eos_id, dtype=np.int32)
    ends = np.cumsum(lengths)
    for piece, end in zip(pieces, ends):
        out[end - 1 - len(piece):end - 1] = piece
    return out, lengths


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus EOS = 256 (vocabulary 257)."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (its UTF-8 bytes), no EOS."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Text of token ids; EOS becomes a newline, invalid UTF-8 a replacement character."""
        return bytes(i if i != self.eos_id else 10 for i in ids).decode("utf-8", errors="replace")

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All documents' tokens, each followed by EOS, concatenated; and each document's length (EOS included)."""
        encoded = [t.encode("utf-8") for t in texts]
        flat = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int32)
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        # np.insert places each EOS before the given index, i.e. right after each document.
        return np.insert(flat, np.cumsum(lengths), self.eos_id), lengths + 1


def gpt2_rank_file() -> Path:
    """The cached GPT-2 rank file, fetched from the openai-whisper sdist on PyPI and checked by sha256 if absent."""
    path = cache_dir() / "tokenizers" / "gpt2.tiktoken"
    if path.exists():
        data = path.read_bytes()
        if sha256_bytes(data) == GPT2_RANKS_SHA256:
            return path
        raise RuntimeError(f"{path} has the wrong sha256 (expected {GPT2_RANKS_SHA256}): delete it so it is "
                           "fetched again, or replace it with the official r50k_base.tiktoken")
    requirement, filename, archive_sha, member = _WHISPER
    archive = fetch_package(requirement, filename, archive_sha)
    with tarfile.open(archive, "r:gz") as tar:
        f = tar.extractfile(member)
        if f is None:
            raise RuntimeError(f"{archive} has no file {member}")
        data = f.read()
    if sha256_bytes(data) != GPT2_RANKS_SHA256:
        raise RuntimeError(f"{member} in {archive} has sha256 {sha256_bytes(data)}, expected {GPT2_RANKS_SHA256}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


class GPT2Tokenizer:
    """GPT-2 BPE (tiktoken's r50k_base): vocabulary 50257, EOS `<|endoftext|>` = 50256."""

    name = "gpt2"
    vocab_size = 50257
    eos_id = 50256

    def __init__(self):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        from tiktoken_ext.openai_public import r50k_pat_str

        ranks = load_tiktoken_bpe(str(gpt2_rank_file()), expected_hash=GPT2_RANKS_SHA256)
        self._enc = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                      special_tokens={"<|endoftext|>": self.eos_id},
                                      explicit_n_vocab=self.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; `<|endoftext|>` inside the text is ordinary text, not EOS."""
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        """Text of token ids."""
        return self._enc.decode(list(ids))

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All documents' tokens, each followed by EOS, concatenated; and each document's length (EOS included)."""
        pieces = [np.asarray(ids, dtype=np.int32) for ids in self._enc.encode_ordinary_batch(texts, num_threads=1)]
        return _join_with_eos(pieces, self.eos_id)


TOKENIZERS = {"gpt2": GPT2Tokenizer, "byte": ByteTokenizer}


@lru_cache(maxsize=None)
def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name` ("gpt2" or "byte"), built once per process."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}: choose one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[name]()
