"""prepare_data: packing, held-out validation, shards (webdataset's writer, the fixed layout, readable by
webdataset), CRC32 sidecars, the CLI (errors exit 2 with one line), atomic --overwrite, built-in corpora."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from sedd_scale.data.corpora import load_corpus
from sedd_scale.data.manifest import Manifest, TokenizerInfo
from sedd_scale.data.packing import Packer
from sedd_scale.data.prepare import PrepareConfig, PrepareError, prepare, write_sequences
from sedd_scale.data.reader import RowReader
from sedd_scale.data.shards import read_shard
from sedd_scale.data.tar_layout import ShardLayout, default_seqs_per_sample

ROOT = Path(__file__).resolve().parents[1]


def documents(n: int, seed: int = 0) -> list[str]:
    """Random documents of random length with non-ASCII words."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "δέλτα", "ε", "zeta", "éta", "θ", "ιώτα", "kappa", "中文", "😀"]
    return [" ".join(rng.choice(words, size=rng.integers(0, 60))) for _ in range(n)]


def split_tokens(manifest: Manifest, split: str) -> np.ndarray:
    """All tokens of a split, read back from its shards by parsing them as tar files."""
    parts = [read_shard(Path(r.tar).read_bytes(), r.tar, r.info, manifest.layout, manifest.dtype)
             for r in manifest.shard_refs(split)]
    return np.concatenate(parts).reshape(-1)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below a folder and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_packer_matches_concatenation():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 500, size=rng.integers(0, 40)) for _ in range(100)]
    packer, out = Packer(17, np.dtype("<u2")), []
    for d in docs:
        out.append(packer.add(d))
    flat = np.concatenate(docs)
    assert np.concatenate(out).reshape(-1).tolist() == flat[:len(flat) // 17 * 17].tolist()
    assert packer.finish() == len(flat) % 17 and packer.num_sequences == len(flat) // 17


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_prepare_holds_out_documents_and_packs_exactly(tmp_path, tokenizer):
    docs = documents(400)
    stats = {}
    for workers in (1, 2):
        config = PrepareConfig(tmp_path / f"w{workers}", tokenizer=tokenizer, seq_len=32, valid_fraction=0.1,
                               workers=workers, seqs_per_sample=3, shard_tokens=32 * 40, chunk_docs=17,
                               progress=False)
        stats[workers] = prepare({"train": iter(docs)}, config, {"test": True})
    m = stats[1].manifest
    assert m.to_json() == stats[2].manifest.to_json()  # byte-identical shards whatever the worker count
    from sedd_scale.data.tokenizer import get_tokenizer
    tok = get_tokenizer(tokenizer)
    for split, chosen in (("train", [d for i, d in enumerate(docs) if i % 10 != 9]),
                          ("valid", [d for i, d in enumerate(docs) if i % 10 == 9])):
        stream = [t for d in chosen for t in tok.encode(d) + [tok.eos_id]]
        info = m.splits[split]
        assert info.num_documents == len(chosen)
        assert info.dropped_tokens == len(stream) % 32 and info.num_tokens == len(stream) // 32 * 32
        assert split_tokens(m, split).tolist() == stream[:info.num_tokens]
    assert len(m.splits["train"].shards) > 2
    assert (m.tokenizer.name, m.tokenizer.vocab_size, m.seq_len, m.dtype) == (tokenizer, tok.vocab_size, 32, "uint16")
    assert stats[1].tokens == sum(len(tok.encode(d)) + 1 for d in docs)


def test_shards_are_webdataset_readable(tmp_path):
    config = PrepareConfig(tmp_path / "d", tokenizer="byte", seq_len=16, valid_fraction=0.0, workers=1,
                           seqs_per_sample=4, shard_tokens=16 * 12, progress=False)
    m = prepare({"train": iter(documents(50))}, config, {}).manifest
    urls = [r.tar for r in m.shard_refs("train")]
    samples = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False))
    assert all(set(s) == {"__key__", "__url__", "__local_path__", "tokens.u16"} for s in samples)
    assert [int(s["__key__"]) for s in samples] == list(range(0, m.splits["train"].num_sequences, 4))
    got = np.concatenate([np.frombuffer(s["tokens.u16"], dtype="<u2") for s in samples])
    assert got.tolist() == split_tokens(m, "train").tolist()
    assert m.splits["train"].num_sequences % 4  # the last sample is partial, and still read right


@pytest.mark.parametrize("seq_len,vocab,per_sample,n", [(8, 50257, 5, 23), (16, 257, 4, 12), (1024, 50257, 8, 19),
                                                         (7, 70000, 3, 10), (300, 50257, 1, 4)])
def test_the_fixed_layout_is_what_webdataset_writes(tmp_path, seq_len, vocab, per_sample, n):
    rng = np.random.default_rng(seq_len)
    seqs = rng.integers(0, vocab, size=(n, seq_len))
    m = write_sequences(tmp_path, {"train": seqs}, TokenizerInfo("t", vocab, 0), per_sample,
                        seqs_per_shard=-(-n // per_sample) * per_sample)  # one shard, its last sample partial
    (ref,) = m.shard_refs("train")
    layout = m.layout
    assert layout == ShardLayout(seq_len, 2 if vocab <= 65536 else 4, per_sample)
    assert os.path.getsize(ref.tar) == ref.info.num_bytes == layout.shard_bytes(n)
    with tarfile.open(ref.tar) as tar:
        members = tar.getmembers()
    assert len(members) == -(-n // per_sample)
    for j, member in enumerate(members):  # where tarfile finds each sample is where the layout says it is
        assert member.offset_data == layout.row_offsets([j * per_sample])[0]
        assert member.size == min(per_sample, n - j * per_sample) * layout.row_bytes
        assert (member.mtime, member.uname, member.mode) == (0, "", 0o644)  # reproducible bytes
    got = RowReader(layout, m.np_dtype).read(ref, np.arange(n)[::-1])  # by computed offsets, CRC32-checked
    assert got[::-1].astype(np.int64).tolist() == seqs.tolist()
    crcs = np.frombuffer(Path(ref.crc).read_bytes(), "<u4")
    assert crcs.tolist() == [zlib.crc32(seqs[i].astype(m.np_dtype).tobytes()) for i in range(n)]


def test_default_sample_is_16_kib():
    assert default_seqs_per_sample(1024, 2) == 8 and default_seqs_per_sample(1024, 4) == 4
    assert default_seqs_per_sample(128, 2) == 64 and default_seqs_per_sample(16384, 2) == 1


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools/prepare_data.py"), *args, "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_inputs_verify_and_errors(tmp_path):
    docs = documents(30, seed=2)
    (tmp_path / "txt").mkdir()
    for i in range(3):
        (tmp_path / "txt" / f"f{i}.txt").write_text("\n".join(docs[10 * i:10 * i + 10]) + "\n")
    with open(tmp_path / "d.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"body": d, "id": 1}) + "\n")
    r = run_cli("--input", str(tmp_path / "txt" / "*.txt"), "--docs", "line", "--tokenizer", "byte",
                "--seq-len", "16", "--valid-fraction", "0.2", "--workers", "2", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert "throughput:" in r.stdout and "tokens/s" in r.stdout
    a = Manifest.load(tmp_path / "a" / "manifest.json")
    assert (a.splits["train"].num_documents, a.splits["valid"].num_documents) == (24, 6)
    r = run_cli("--jsonl", str(tmp_path / "d.jsonl"), "--field", "body", "--tokenizer", "byte", "--seq-len", "16",
                "--valid-fraction", "0.2", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    b = Manifest.load(tmp_path / "b" / "manifest.json")
    assert split_tokens(a, "train").tolist() == split_tokens(b, "train").tolist()  # same documents, same order
    assert run_cli("--verify", str(tmp_path / "b" / "manifest.json")).returncode == 0
    shard = tmp_path / "b" / b.splits["train"].shards[0].path
    shard.write_bytes(shard.read_bytes()[:-512])
    r = run_cli("--verify", str(tmp_path / "b" / "manifest.json"))
    assert r.returncode == 1 and f"BAD train: shard {shard} is" in r.stdout and "1 bad shard(s)" in r.stdout
    r = run_cli("--jsonl", str(tmp_path / "d.jsonl"), "--field", "text", "--out", str(tmp_path / "c"))
    assert bad_input(r, "d.jsonl:1: no string field 'text'") and "--field" in r.stderr


def test_bad_input_is_one_line_and_exit_status_2(tmp_path):
    (tmp_path / "a.txt").write_text("some text\n")
    assert bad_input(run_cli("--input", str(tmp_path / "none*.txt"), "--out", str(tmp_path / "c")), "matches no file")
    assert bad_input(run_cli("--input", str(tmp_path / "a.txt"), "--tokenizer", "bpe", "--out", str(tmp_path / "c")),
                     "unknown tokenizer 'bpe': use gpt2 or byte or the path of a Hugging Face tokenizer.json")
    assert bad_input(run_cli("--verify", str(tmp_path / "nothing.json")), "does not exist: prepare the data")
    assert not (tmp_path / "c").exists()


def bad_input(r: subprocess.CompletedProcess, message: str) -> bool:
    """The tool refused bad input: exit status 2 and one line on stderr, holding `message`."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert message in r.stderr, r.stderr
    return True


def test_non_utf8_input_is_one_clear_line(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("fine text\n")
    (tmp_path / "in" / "b.txt").write_bytes("caf\u00e9 in latin-1\n".encode("latin-1"))
    r = run_cli("--input", str(tmp_path / "in"), "--tokenizer", "byte", "--out", str(tmp_path / "out"))
    assert bad_input(r, f"{tmp_path / 'in' / 'b.txt'} is not UTF-8 text (byte 0xe9 at offset 3")
    assert "convert it to UTF-8" in r.stderr and not (tmp_path / "out").exists()
    with open(tmp_path / "d.jsonl", "wb") as f:
        f.write(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    r = run_cli("--jsonl", str(tmp_path / "d.jsonl"), "--tokenizer", "byte", "--out", str(tmp_path / "out"))
    assert bad_input(r, f"{tmp_path / 'd.jsonl'}:2 is not UTF-8 text")
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # the half-built dataset is gone


def test_out_is_refused_unless_new_or_empty_and_overwrite_replaces_atomically(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("\n".join(documents(60, seed=4)))
    args = ["--input", str(tmp_path / "txt"), "--docs", "line", "--tokenizer", "byte", "--shard-tokens", "256",
            "--seqs-per-sample", "4"]
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    assert run_cli(*args, "--seq-len", "16", "--out", str(out)).returncode == 0
    first = snapshot(out)
    assert len(first) > 6
    r = run_cli(*args, "--seq-len", "32", "--out", str(out))
    assert bad_input(r, f"--out {out} is not empty") and "--overwrite" in r.stderr
    assert snapshot(out) == first  # nothing pre-existing was lost
    r = run_cli(*args, "--seq-len", "32", "--overwrite", "--out", str(out))
    assert r.returncode == 0, r.stderr
    new = Manifest.load(out / "manifest.json")
    assert new.seq_len == 32
    listed = {"manifest.json"} | {f for s in new.splits.values() for x in s.shards for f in (x.path, x.crc_path)}
    assert set(snapshot(out)) == listed  # the old shards are gone: no orphans
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "txt"]  # no temporary siblings left
    # a failure midway (here: a bad input file found late) leaves the old dataset as it was
    (tmp_path / "txt" / "z.txt").write_bytes(b"\xff\xfe not utf-8")
    second = snapshot(out)
    assert bad_input(run_cli(*args, "--seq-len", "64", "--overwrite", "--out", str(out)), "is not UTF-8 text")
    assert snapshot(out) == second and sorted(p.name for p in tmp_path.iterdir()) == ["out", "txt"]
    # --overwrite replaces a dataset, nothing else
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("keep me")
    docs = {"train": iter(documents(5))}
    with pytest.raises(PrepareError, match="mine has no manifest.json: --overwrite only replaces a prepared dataset"):
        prepare(docs, PrepareConfig(tmp_path / "mine", tokenizer="byte", progress=False, overwrite=True), {})
    (out / "notes.md").write_text("keep me too")
    with pytest.raises(PrepareError, match="out holds 'notes.md', which is not part of a dataset"):
        prepare(docs, PrepareConfig(out, tokenizer="byte", progress=False, overwrite=True), {})
    assert (tmp_path / "mine" / "notes.md").read_text() == "keep me" and (out / "notes.md").exists()
    with pytest.raises(PrepareError, match="a.txt is a file, not a directory"):
        prepare(docs, PrepareConfig(tmp_path / "txt" / "a.txt", tokenizer="byte", progress=False), {})


def test_an_interrupted_build_or_swap_keeps_the_old_dataset(tmp_path, monkeypatch):
    out = tmp_path / "d"
    config = PrepareConfig(out, tokenizer="byte", seq_len=16, valid_fraction=0.0, workers=1, shard_tokens=64,
                           progress=False, overwrite=True)
    prepare({"train": iter(documents(40))}, config, {})
    before = snapshot(out)

    def interrupted():
        yield from documents(30, seed=1)
        raise KeyboardInterrupt  # e.g. Ctrl-C after some shards were written

    with pytest.raises(KeyboardInterrupt):
        prepare({"train": interrupted()}, config, {})
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    real, calls = os.replace, []

    def failing_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new dataset onto `out`, after the old one was moved aside
            raise OSError("simulated failure between the two renames")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="simulated"):
        prepare({"train": iter(documents(20, seed=2))}, config, {})
    monkeypatch.undo()
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with pytest.raises(PrepareError, match="is not empty"):
        prepare({"train": iter(documents(5))}, PrepareConfig(out, tokenizer="byte", progress=False), {})


def test_a_killed_preparations_folders_are_removed_by_the_next_one_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "d"
    config = PrepareConfig(out, tokenizer="byte", seq_len=16, valid_fraction=0.0, workers=1, shard_tokens=64,
                           progress=False, overwrite=True)
    prepare({"train": iter(documents(40))}, config, {})
    committed = snapshot(out)
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited (and been reaped): its folders are stale
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        siblings = {name: tmp_path / name for name in (
            f".d.tmp-{dead_pid}@{host}.k1ll3d", f".d.old-{dead_pid}@{host}.r3plcd",  # stale: removed
            f".d.tmp-{live.pid}@{host}.w0rk1n",  # a preparation in progress: kept
            f".d.tmp-{dead_pid}@elsewhere.example.org.n0d3s",  # another host's: cannot be checked here, kept
            ".d.tmp-x7q2ab",  # no owner recorded (an older version's): kept
            f".e.tmp-{dead_pid}@{host}.0th3r")}  # another --out's: not this preparation's business
        for path in siblings.values():
            path.mkdir()
            (path / "manifest.json").write_text("{}")
        stats = prepare({"train": iter(documents(30, seed=1))}, config, {})
        err = capsys.readouterr().err
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["d", *list(siblings)[2:]]), left
        assert Manifest.load(out / "manifest.json").fingerprint() == stats.manifest.fingerprint()
        assert snapshot(out) != committed  # the new dataset replaced the committed one, as --overwrite asks
        for name in list(siblings)[:2]:
            assert f"removed {siblings[name]}: a temporary folder of a preparation of {out} (process {dead_pid}) " \
                   "that was killed" in err, err
        assert f"left {siblings[list(siblings)[3]]}: a temporary folder of a preparation of {out} by process " \
               f"{dead_pid} on host elsewhere.example.org, which this host cannot check" in err, err
        assert f"left {siblings['.d.tmp-x7q2ab']}: a temporary folder of a preparation of {out} by an unknown " \
               "process" in err, err
        assert str(live.pid) not in err and ".e.tmp" not in err
        # killed between its two renames: the old dataset sits aside and nothing replaced it, so it is kept
        aside = tmp_path / f".d.old-{dead_pid}@{host}.4s1d3"
        out.rename(aside)
        prepare({"train": iter(documents(20, seed=2))}, config, {})
        assert aside.is_dir() and out.is_dir()
        assert f"left {aside}: it holds the dataset {out} had before" in capsys.readouterr().err
    finally:
        live.stdin.close()
        live.wait()


def test_ptb_official_splits(tmp_path):
    splits = load_corpus("ptb")
    config = PrepareConfig(tmp_path, tokenizer="byte", seq_len=128, workers=2, progress=False)
    m = prepare(splits, config, {"corpus": "ptb"}).manifest
    # the standard Mikolov files have 42068 / 3370 / 3761 lines
    assert {k: v.num_documents for k, v in m.splits.items()} == {"train": 42068, "valid": 3370, "test": 3761}
    head = bytes(split_tokens(m, "test")[:25].tolist()).decode()
    assert head == "no it wasn't black monday"  # detokenised: "was n't" -> "wasn't"


@pytest.mark.slow
def test_bible_and_wiki_corpora():
    bible, wiki = load_corpus("bible"), load_corpus("wiki")
    assert set(bible) == set(wiki) == {"train"}
    chapters, articles = list(bible["train"]), list(wiki["train"])
    assert len(chapters) == 1189 and chapters[0].startswith("In the beginning God created the heaven and the earth.")
    assert len(articles) == 10033 and all(articles)
