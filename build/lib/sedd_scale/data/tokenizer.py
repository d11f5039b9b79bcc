"""Tokenizers: GPT-2 BPE (the SEDD paper's, through tiktoken), raw UTF-8 bytes for tiny CPU runs, and any
Hugging Face `tokenizer.json` a user brings (through the `tokenizers` library).

A tokenizer is named by a spec: "gpt2", "byte", or the path of a tokenizer.json file. tiktoken
normally downloads GPT-2's rank file from a host these machines cannot reach. The identical file
ships in the openai-whisper sdist on PyPI: it is fetched once with pip, checked by sha256 and
cached as `$SEDD_CACHE/tokenizers/gpt2.tiktoken`. Placing that file there by hand (same sha256)
works fully offline. A tokenizer.json is read locally; nothing is downloaded. Its end-of-document
token is the one named (`eos_token`), else the first of `EOS_TOKENS` among its special tokens.
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
    sha256: str | None  # of the file that defines it (None: defined by the code alone)

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
    sha256 = None

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
    sha256 = GPT2_RANKS_SHA256

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


EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")


class JsonTokenizer:
    """A Hugging Face tokenizer.json: vocabulary from the file (largest id + 1), EOS named or found."""

    def __init__(self, path: str | Path, eos_token: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"tokenizer file {self.path} does not exist: give the path of a Hugging Face "
                             "tokenizer.json (or gpt2 / byte)")
        data = self.path.read_bytes()
        try:
            self._tok = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust library raises bare Exception for a malformed file
            raise ValueError(f"{self.path} is not a Hugging Face tokenizer.json ({e}): save one with "
                             "tokenizers' Tokenizer.save or transformers' save_pretrained") from e
        self._tok.encode_special_tokens = True  # special tokens inside a document's text stay text, as for gpt2
        self.name, self.sha256 = self.path.name, sha256_bytes(data)
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        if eos_token is not None:
            found = self._tok.token_to_id(eos_token)
            if found is None:
                raise ValueError(f"{self.path} has no token {eos_token!r}: name its end-of-document token "
                                 f"(special tokens: {sorted(specials)})")
            self._eos: int | None = found
        else:
            self._eos = next((specials[t] for t in EOS_TOKENS if t in specials), None)
        self._specials = sorted(specials)

    @property
    def eos_id(self) -> int:
        """The end-of-document id (packing appends it to every document)."""
        if self._eos is None:
            raise ValueError(f"{self.path} has none of the usual end-of-document tokens {list(EOS_TOKENS)} among "
                             f"its special tokens {self._specials}: name one with --eos-token")
        return self._eos

    @property
    def eos_token(self) -> str | None:
        """The end-of-document token's text (None when the file has none of the usual ones)."""
        return None if self._eos is None else self._tok.id_to_token(self._eos)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (special tokens kept)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All documents' tokens, each followed by EOS, concatenated; and each document's length (EOS included)."""
        eos = self.eos_id
        # one document at a time: the library's thread pool would be forked by prepare's process pool
        return _join_with_eos([np.asarray(self.encode(t), dtype=np.int32) for t in texts], eos)


TOKENIZERS = {"gpt2": GPT2Tokenizer, "byte": ByteTokenizer}
TOKENIZER_SPECS = f"{' or '.join(TOKENIZERS)} or the path of a Hugging Face tokenizer.json"


def is_tokenizer_file(spec: str) -> bool:
    """Whether a spec names a tokenizer.json file (rather than a built-in tokenizer)."""
    return spec not in TOKENIZERS and spec.endswith(".json")


def _check_spec(spec: str) -> None:
    if spec not in TOKENIZERS and not is_tokenizer_file(spec):
        raise ValueError(f"unknown tokenizer {spec!r}: use {TOKENIZER_SPECS}")


@lru_cache(maxsize=None)
def _cached(spec: str, eos_token: str | None) -> Tokenizer:
    if spec in TOKENIZERS:
        return TOKENIZERS[spec]()
    return JsonTokenizer(spec, eos_token)


def get_tokenizer(spec: str, eos_token: str | None = None) -> Tokenizer:
    """The tokenizer `spec` names ("gpt2", "byte" or a tokenizer.json path), built once per process.

    `eos_token` picks a tokenizer.json's end-of-document token (built-in tokenizers have theirs).
    """
    _check_spec(spec)
    if spec in TOKENIZERS and eos_token is not None:
        raise ValueError(f"tokenizer {spec} has a fixed end-of-document token; --eos-token is for tokenizer.json files")
    return _cached(spec if spec in TOKENIZERS else str(Path(spec).resolve()), eos_token)


def tokenizer_identity(spec: str) -> tuple[str, str | None]:
    """(name, sha256) a manifest records for `spec`, without building a built-in tokenizer (no rank file fetched)."""
    _check_spec(spec)
    if spec in TOKENIZERS:
        return spec, TOKENIZERS[spec].sha256
    tok = get_tokenizer(spec)
    return tok.name, tok.sha256


def tokenizer_vocab_size(spec: str) -> int:
    """Vocabulary size of `spec` (what model.num_tokens must equal), without building a built-in tokenizer."""
    _check_spec(spec)
    return TOKENIZERS[spec].vocab_size if spec in TOKENIZERS else get_tokenizer(spec).vocab_size
