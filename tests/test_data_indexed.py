"""Megatron indexed datasets (PREFIX.bin/.idx written by megatron-core's own IndexedDatasetBuilder) as a data source:
rows are the documents concatenated and cut (numpy oracle), one global stream under DP1 and DP2, exact resume,
blending with tar-shard manifests, a valid split, reads that touch only a row's pages, clear errors for bad files."""
from __future__ import annotations

import json
import mmap
import os
import shutil
from pathlib import Path

import sedd_scale.compat  # noqa: F401  (before megatron-core)

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from sedd_scale.data.checked import check_split
from sedd_scale.data.indexed import IndexedRows, prepare_megatron
from sedd_scale.data.loader import EvalLoader, LoaderConfig, TokenLoader
from sedd_scale.data.manifest import Manifest, ManifestError, TokenizerInfo
from sedd_scale.data.shards import ShardError
from tests.test_data_loader import VOCAB, layout_batches, make_dataset, resumed_stream, same, take

pytestmark = pytest.mark.megatron

SEQ_LEN = 8  # layout_batches' sequence length
EOS = VOCAB.eos_id


def documents(seed: int, n: int, eod: bool) -> list[np.ndarray]:
    """n documents of random ids (lengths 0..30), each ending with EOS when `eod` (preprocess_data --append-eod)."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, EOS, size=int(rng.integers(0 if not eod else 1, 31))) for _ in range(n)]
    return [np.append(d, EOS) if eod else d for d in docs]


def write_megatron(prefix: Path, docs: list[np.ndarray], vocab_size: int = VOCAB.vocab_size) -> str:
    """PREFIX.bin/.idx as Megatron's preprocess_data writes them (dtype as megatron picks for the vocabulary);
    every 5th document in two "sentences" (--split-sentences: one document, two sequences of the .idx)."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(vocab_size))
    for i, doc in enumerate(docs):
        cut = len(doc) // 2
        lengths = [cut, len(doc) - cut] if i % 5 == 4 and len(doc) > 1 else [len(doc)]
        builder.add_document(doc, lengths)  # what preprocess_data passes: ids, not a tensor
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def oracle_rows(docs: list[np.ndarray], insert_eos: bool) -> tuple[np.ndarray, int]:
    """The documents concatenated (EOS after each if inserted) and cut into SEQ_LEN rows; the dropped tail's size."""
    stream = np.concatenate([np.append(d, EOS) if insert_eos else d for d in docs]).astype(np.int64)
    n = len(stream) // SEQ_LEN
    return stream[:n * SEQ_LEN].reshape(n, SEQ_LEN), len(stream) - n * SEQ_LEN


@pytest.fixture(scope="module")
def mega(tmp_path_factory) -> dict:
    """An --append-eod dataset (held-out valid: its last documents), one without EOD (inserted) with its own
    valid prefix, and a tar-shard dataset of the same tokenizer to blend with."""
    root = tmp_path_factory.mktemp("indexed")
    eod = documents(0, 120, eod=True)
    plain, plain_valid = documents(1, 90, eod=False), documents(2, 20, eod=False)
    plain[7] = plain[8][:0]  # an empty document: with EOS inserted it is one EOS
    out = {"eod_docs": eod, "plain_docs": plain, "plain_valid_docs": plain_valid, "root": root}
    out["eod_prefix"] = write_megatron(root / "eod_text_document", eod)
    out["eod"] = prepare_megatron(out["eod_prefix"], root / "eod", VOCAB, SEQ_LEN, valid_fraction=0.1).location
    out["plain_prefix"] = write_megatron(root / "plain_text_document", plain)
    valid_prefix = write_megatron(root / "plain_valid_text_document", plain_valid)
    out["plain"] = prepare_megatron(out["plain_prefix"], root / "plain", VOCAB, SEQ_LEN, valid_prefix=valid_prefix,
                                    insert_eos=True, seqs_per_sample=3).location
    out["tar"] = make_dataset(root / "tar", 61, first_id=10_000)
    return out


def all_rows(manifest: str, split: str) -> np.ndarray:
    """Every row of a split, read in a shuffled order and put back in place."""
    checked = check_split(manifest, split)
    order = np.random.default_rng(3).permutation(checked.num_sequences)
    got = np.empty((checked.num_sequences, SEQ_LEN), dtype=np.int64)
    got[order] = IndexedRows(checked.indexed).read(order)
    return got


@pytest.mark.parametrize("kind", ["eod", "plain"])
def test_rows_are_the_documents_concatenated_and_cut(mega, kind):
    m = Manifest.load(mega[kind])
    if kind == "eod":  # valid: the last 12 of 120 documents (valid_fraction 0.1), EOS already in the data
        train_docs, valid_docs, insert = mega["eod_docs"][:108], mega["eod_docs"][108:], False
    else:
        train_docs, valid_docs, insert = mega["plain_docs"], mega["plain_valid_docs"], True
    for split, docs in (("train", train_docs), ("valid", valid_docs)):
        rows, dropped = oracle_rows(docs, insert)
        info = m.split(split)
        assert (info.num_documents, info.num_sequences, info.dropped_tokens) == (len(docs), len(rows), dropped)
        assert info.indexed.insert_eos is insert and info.indexed.dtype == "uint16"  # megatron's pick for GPT-2
        assert np.array_equal(all_rows(mega[kind], split), rows)
    # the evaluation loader reads the valid split in order, padded past its end
    rows, _ = oracle_rows(valid_docs, insert)
    batches = list(EvalLoader(mega[kind], "valid", micro_batch=4))
    tokens = torch.cat([b.tokens[b.valid] for b in batches]).numpy()
    assert np.array_equal(tokens, rows)


def test_a_vocabulary_over_65500_is_read_from_megatrons_int32(tmp_path):
    vocab = TokenizerInfo("big.json", 70_000, 69_999, "0" * 64)
    rng = np.random.default_rng(5)
    docs = [np.append(rng.integers(60_000, 69_999, size=int(rng.integers(1, 20))), 69_999) for _ in range(25)]
    prefix = write_megatron(tmp_path / "big_text_document", docs, vocab_size=vocab.vocab_size)
    manifest = prepare_megatron(prefix, tmp_path / "m", vocab, SEQ_LEN, valid_fraction=0)
    assert (manifest.split("train").indexed.dtype, manifest.dtype) == ("int32", "uint32")
    stream = np.concatenate(docs)
    n = len(stream) // SEQ_LEN
    assert np.array_equal(all_rows(manifest.location, "train"), stream[:n * SEQ_LEN].reshape(n, SEQ_LEN))


def test_dp2_reads_the_dp1_stream_which_covers_every_row_once_per_epoch(mega):
    manifests = [mega["plain"]]
    total = Manifest.load(mega["plain"]).split("train").num_sequences
    reference = layout_batches(manifests, 1, 8, 8, 12, seed=5)  # 96 rows: past the end of the first epoch
    for dp, mb, workers in ((2, 2, 0), (2, 4, 0), (2, 2, 2)):
        assert same(layout_batches(manifests, dp, mb, 8, 12, seed=5, workers=workers), reference), (dp, mb, workers)
    stream = torch.cat(take(TokenLoader(LoaderConfig(manifests, SEQ_LEN, 1, seed=5)), total)).numpy()
    rows, _ = oracle_rows(mega["plain_docs"], True)
    assert sorted(map(bytes, stream.astype(np.int64))) == sorted(map(bytes, rows))  # each row exactly once
    assert not np.array_equal(stream, rows)  # shuffled


def test_resume_mid_epoch_and_mid_step_is_exact(mega):
    config = LoaderConfig([mega["eod"]], seq_len=SEQ_LEN, micro_batch=4, seed=2, global_batch=8)
    reference = take(TokenLoader(config), 90)  # 360 rows: ~1.5 epochs of 243
    got = resumed_stream(config, [3, 17, 31, 39])  # odd cuts: mid-step states, mid-epoch; the last spans its end
    assert same(got, reference)
    state = TokenLoader(config).state_dict()
    assert state["sources"][0]["manifest"] == mega["eod"] and len(state["sources"][0]["fingerprint"]) == 64


def test_blends_with_a_tar_shard_manifest_by_weight(mega):
    manifests = [mega["eod"], mega["tar"]]
    config = LoaderConfig(manifests, SEQ_LEN, 1, weights=[3.0, 1.0], seed=4)
    stream = torch.cat(take(TokenLoader(config), 400)).numpy()
    # make_dataset's row k: 10000+k, then (10000+k) * 7 + j for j >= 1 (mod the vocabulary)
    tar = (stream[:, 0] >= 10_000) & (stream[:, 0] < 10_061) & (
        stream[:, 1:] == (stream[:, :1] * 7 + np.arange(1, SEQ_LEN)) % VOCAB.vocab_size).all(axis=1)
    eod_rows = {bytes(r) for r in all_rows(mega["eod"], "train")}
    indexed = np.array([bytes(r) in eod_rows for r in stream])
    assert (tar ^ indexed).all() and tar.sum() == 100  # the largest-deficit rule: exactly 1 in 4 over 400 rows
    assert same(layout_batches(manifests, 2, 2, 8, 10, seed=4), layout_batches(manifests, 1, 8, 8, 10, seed=4))
    # a shard manifest's JSON (so its fingerprint, which resumes compare) has no "indexed" key
    assert "indexed" not in json.loads(Path(mega["tar"]).read_text())["splits"]["train"]


def _read_bytes() -> int:
    """Bytes this process has had read from storage (/proc/self/io: page-cache misses, readahead included)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["read_bytes"])


def _evict(path: str) -> None:
    """Drop a (clean) file's pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(not Path("/proc/self/io").exists() or not hasattr(os, "posix_fadvise"),
                    reason="measures reads with Linux's /proc/self/io")
def test_reading_rows_reads_only_their_pages(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(0, EOS, size=1 << 20), EOS) for _ in range(4)]  # 8 MiB of uint16
    prefix = write_megatron(tmp_path / "big", docs)
    manifest = prepare_megatron(prefix, tmp_path / "m", VOCAB, 1024, valid_fraction=0)
    path = prefix + ".bin"
    _evict(path)
    before = _read_bytes()
    Path(path).read_bytes()
    if _read_bytes() - before < os.path.getsize(path) // 2:
        pytest.skip("this filesystem keeps the file in memory (no read reaches storage): nothing to measure")
    reader = IndexedRows(check_split(manifest.location, "train").indexed)
    rows = np.array([5, 1000, 2500, 4000])
    _evict(path)
    before = _read_bytes()
    got = reader.read(rows)
    read = _read_bytes() - before
    stream = np.concatenate(docs)
    assert np.array_equal(got, np.stack([stream[r * 1024:(r + 1) * 1024] for r in rows]))
    # 4 rows of 2 KiB: at most 2 pages each. Without MADV_RANDOM the kernel's mmap readahead reads the whole 8 MiB.
    assert 0 < read <= 4 * 2 * mmap.PAGESIZE, read


def _prepare_tool(*argv: str) -> int:
    from sedd_scale.cli.prepare_data import main

    return main(list(argv))


def test_tool_prepares_and_verifies_and_bad_files_are_named(tmp_path, capsys):
    docs = [np.append(np.random.default_rng(i).integers(0, 256, size=40 + i), 256) for i in range(30)]
    prefix = write_megatron(tmp_path / "bytes_text_document", docs, vocab_size=257)
    out = tmp_path / "data"
    assert _prepare_tool("--from-megatron", prefix, "--tokenizer", "byte", "--seq-len", "16", "--out", str(out)) == 0
    manifest = str(out / "manifest.json")
    assert sorted(os.listdir(out)) == ["manifest.json"]  # nothing copied
    assert _prepare_tool("--verify", manifest) == 0
    assert "all shards intact" in capsys.readouterr().out
    loader = TokenLoader(LoaderConfig([manifest], 16, 2))
    loader.check_compatible(257, 16, "byte")
    with pytest.raises(ManifestError, match="model.num_tokens"):
        loader.check_compatible(256, 16, "byte")

    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    saved = bin_path.read_bytes()
    data = bytearray(saved)  # same size, one id made 0xFFFF: sizes pass, --verify's sha256 and the read catch it
    data[6:8] = b"\xff\xff"
    bin_path.write_bytes(bytes(data))
    assert _prepare_tool("--verify", manifest) == 1
    assert f"sha256 mismatch for Megatron indexed dataset file {bin_path}" in capsys.readouterr().out
    with pytest.raises(ShardError, match=rf"{bin_path}.*65535.*outside the vocabulary.*--verify"):
        IndexedRows(check_split(manifest, "train").indexed).read(np.arange(3))

    bin_path.write_bytes(saved + b"\0\0")  # wrong size: refused at start, naming the file and the fix
    with pytest.raises(ShardError, match=rf"{bin_path} is {len(saved) + 2} bytes but the manifest says "
                                         rf"{len(saved)}.*restore"):
        TokenLoader(LoaderConfig([manifest], 16, 2))
    bin_path.write_bytes(saved)
    index = idx_path.read_bytes()
    idx_path.write_bytes(b"X" + index[1:])  # same size, a header megatron-core refuses
    with pytest.raises(ShardError, match=rf"{idx_path} / {bin_path} cannot be read.*bad header.*restore"):
        IndexedRows(check_split(manifest, "train").indexed).read(np.arange(3))
    assert _prepare_tool("--verify", manifest) == 1
    assert f"sha256 mismatch for Megatron indexed dataset file {idx_path}" in capsys.readouterr().out
    idx_path.write_bytes(index)
    shutil.move(idx_path, tmp_path / "away.idx")  # missing
    with pytest.raises(ShardError, match=rf"missing Megatron indexed dataset file {idx_path}: restore"):
        EvalLoader(manifest, "valid", 2)
    assert _prepare_tool("--verify", manifest) == 1
    shutil.move(tmp_path / "away.idx", idx_path)
    assert _prepare_tool("--verify", manifest) == 0

    # the files moved and the manifest prepared for the new place: the same data, so a run resumes on it
    state = loader.state_dict()
    moved = tmp_path / "moved" / "corpus"
    moved.parent.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.move(prefix + suffix, str(moved) + suffix)
    assert _prepare_tool("--from-megatron", str(moved), "--tokenizer", "byte", "--seq-len", "16", "--out",
                         str(out), "--overwrite") == 0
    TokenLoader(LoaderConfig([manifest], 16, 2)).load_state_dict(state)


def test_preparation_refuses_data_that_does_not_fit(mega, tmp_path, capsys):
    # ids outside the tokenizer's vocabulary: another tokenizer made them
    with pytest.raises(ManifestError, match=r"token id \d+, outside the vocabulary \[0, 257\).*--tokenizer"):
        prepare_megatron(mega["eod_prefix"], tmp_path / "a", TokenizerInfo("byte", 257, 256), SEQ_LEN)
    # documents without an EOS need --insert-eos; documents with one must not get a second
    with pytest.raises(ManifestError, match=r"do not end with the EOS id 50256.*--append-eod.*--insert-eos"):
        prepare_megatron(mega["plain_prefix"], tmp_path / "b", VOCAB, SEQ_LEN)
    with pytest.raises(ManifestError, match="already ends with the EOS id 50256.*drop --insert-eos"):
        prepare_megatron(mega["eod_prefix"], tmp_path / "c", VOCAB, SEQ_LEN, insert_eos=True)
    assert _prepare_tool("--from-megatron", str(tmp_path / "nothing"), "--out", str(tmp_path / "d")) == 2
    assert "nothing.bin does not exist" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abcd")
