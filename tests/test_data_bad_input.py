"""Bad data fails early with an error naming the file and the fix; damage after preparation is caught by the
CRC32 of the rows read (naming shard and sample); skip_corrupt is opt-in, counted and what the errors advise."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sedd_scale.config import DataConfig, RecipeError, from_dict
from sedd_scale.data.checked import check_split
from sedd_scale.data.loader import EvalLoader, LoaderConfig, TokenLoader, check_sources
from sedd_scale.data.manifest import Manifest, ManifestError
from sedd_scale.data.shards import ShardError, read_shard, verify_shard
from tests.test_data_loader import ids, make_dataset, take


@pytest.fixture()
def ds(tmp_path) -> Path:
    """A fresh 6-shard dataset (25 sequences per shard, samples of 5) the test may damage."""
    make_dataset(tmp_path / "d", 150, seqs_per_shard=25, valid=10)
    return tmp_path / "d"


def shard(ds: Path, i: int, suffix: str = ".tar") -> Path:
    return ds / f"train-{i:06d}{suffix}"


def config(ds: Path, **kw) -> LoaderConfig:
    return LoaderConfig([str(ds / "manifest.json")], seq_len=8, micro_batch=4, **kw)


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_truncated_shard_or_sidecar_is_refused_at_start(ds):
    path = shard(ds, 2)
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(ShardError, match=f"shard {path} is 1500 bytes but the manifest says .*truncated.*"
                                         "data.skip_corrupt: true"):
        TokenLoader(config(ds))
    make_dataset(ds.parent / "e", 150, seqs_per_shard=25)
    crc = shard(ds.parent / "e", 4, ".crc32")
    crc.write_bytes(crc.read_bytes()[:-4])
    with pytest.raises(ShardError, match=f"CRC sidecar {crc} is 96 bytes but the manifest says 100"):
        TokenLoader(config(ds.parent / "e"))


def test_damaged_rows_fail_their_crc_naming_shard_and_sample(ds):
    manifest = Manifest.load(ds / "manifest.json")
    layout = manifest.layout
    path = shard(ds, 1)
    flip(path, int(layout.row_offsets([17])[0]) + 3)  # sequence 17 of shard 1 = split-wide 42, in sample 40
    loader = TokenLoader(config(ds))  # sizes are fine: the damage shows when the row is read
    with pytest.raises(ShardError, match=rf"sequence 17 of shard {path} \(sample 000000000040\) fails its CRC32 check"
                                         r".*prepare_data.py --verify"):
        take(loader, 40)  # 38 batches = one epoch: every row gets read
    with pytest.raises(ShardError, match="sequence 17 of shard .* fails its CRC32"):  # through a DataLoader worker
        take(TokenLoader(config(ds, num_workers=2)), 40)
    assert len(ids(take(TokenLoader(config(ds, verify_crc=False)), 38))) == 152  # opting out reads it unchecked
    evaluation = EvalLoader(str(ds / "manifest.json"), "valid", 4)
    flip(ds / "valid-000000.crc32", 8)  # a damaged sidecar entry (sequence 2) is caught the same way
    with pytest.raises(ShardError, match=r"sequence 2 of shard .*valid-000000.tar \(sample 000000000000\) fails"):
        list(evaluation)


def test_a_shard_truncated_during_the_run_is_reported(ds):
    loader = TokenLoader(config(ds))
    it = iter(loader)
    next(it)
    for i in range(6):
        path = shard(ds, i)
        path.write_bytes(path.read_bytes()[:600])  # after the size check at start
    with pytest.raises(ShardError, match="ends before byte .*truncated since the run started"):
        for _ in range(40):
            next(it)


def test_full_verification_finds_every_kind_of_damage(ds):
    manifest = Manifest.load(ds / "manifest.json")
    refs = manifest.shard_refs("train")

    def problem(i: int) -> str | None:
        return verify_shard(shard(ds, i), shard(ds, i, ".crc32"), refs[i], manifest.layout, manifest.dtype)

    assert all(problem(i) is None for i in range(6))
    flip(shard(ds, 0), 700)
    assert problem(0).startswith(f"sha256 mismatch for shard {shard(ds, 0)}")
    flip(shard(ds, 1, ".crc32"), 0)
    assert problem(1).startswith("sha256 mismatch for CRC sidecar")
    shard(ds, 2, ".crc32").unlink()
    assert problem(2) == f"CRC sidecar {shard(ds, 2, '.crc32')} is missing"
    data = bytearray(shard(ds, 3).read_bytes())
    data[100:108] = b"garbage!"  # the first header's mode/checksum field
    with pytest.raises(ShardError, match=f"shard {shard(ds, 3)} is not a readable tar"):
        read_shard(bytes(data), str(shard(ds, 3)), refs[3].info, manifest.layout, manifest.dtype)
    with pytest.raises(ShardError, match="holds 5 sequences but the manifest says 25"):
        read_shard(shard(ds, 4).read_bytes()[:1024] + bytes(1024), "x", refs[4].info, manifest.layout,  # 1 sample
                   manifest.dtype)


def test_missing_shard_is_refused_at_start(ds):
    shard(ds, 4).unlink()
    with pytest.raises(ShardError, match=f"missing shard {shard(ds, 4)}"):
        TokenLoader(config(ds))
    (ds / "valid-000000.tar").unlink()
    with pytest.raises(ShardError, match="missing shard .*valid-000000.tar"):
        EvalLoader(str(ds / "manifest.json"), "valid", 4)


def test_a_missing_shards_advice_fits_a_fresh_run_a_resume_and_evaluation(ds):
    manifest = str(ds / "manifest.json")
    saved = TokenLoader(config(ds))
    take(saved, 3)
    state = saved.state_dict()  # a checkpoint's loader state, all shards read
    shard(ds, 4).unlink()
    with pytest.raises(ShardError, match=f"missing shard {shard(ds, 4)}: restore it or prepare the data again "
                                         r"\(or set data.skip_corrupt: true to train without it\)"):
        check_sources(config(ds))
    fresh = TokenLoader(config(ds, skip_corrupt=True))  # the advice works for a fresh run ...
    assert fresh.skipped_shards == [str(shard(ds, 4))]
    with pytest.raises(ManifestError, match="data.skip_corrupt leaves out other shards"):
        fresh.load_state_dict(state)  # ... not for a resume: so a resume is told otherwise
    with pytest.raises(ShardError) as resumed:
        check_sources(config(ds), resuming=True)
    assert str(resumed.value).startswith(f"missing shard {shard(ds, 4)}: restore it: this run resumes from a "
                                         "checkpoint"), resumed.value
    assert str(resumed.value).endswith("or start a new checkpoint.dir with data.skip_corrupt: true to train without "
                                       "it"), resumed.value
    (ds / "valid-000000.tar").unlink()  # an evaluation split is read whole: skip_corrupt is no advice there
    with pytest.raises(ShardError, match=r"missing shard .*valid-000000.tar: restore it or prepare the data again "
                                         r"\(an evaluation split is read whole: data.skip_corrupt does not apply"):
        EvalLoader(manifest, "valid", 4)
    with pytest.raises(ValueError, match="an evaluation split must be whole"):  # what skip_corrupt would have done
        EvalLoader(manifest, "valid", 4, checked=check_split(manifest, "valid", skip_corrupt=True))
    with pytest.raises(ShardError, match=r"valid-000000.tar: restore it, or point data.valid at another prepared "
                                         "dataset"):
        check_split(manifest, "valid", resuming=True, evaluation=True)


def test_data_prepared_again_under_a_run_is_refused_naming_the_manifest(ds):
    saved = TokenLoader(config(ds))
    take(saved, 3)
    state = saved.state_dict()
    make_dataset(ds, 150, seqs_per_shard=25, valid=10, first_id=1)  # other content, same shape (prepared again)
    with pytest.raises(ManifestError, match=rf"cannot resume on {ds / 'manifest.json'}: the dataset changed since "
                                            r"the checkpoint was saved \(manifest fingerprint [0-9a-f]{12} -> "
                                            r"[0-9a-f]{12}: it was prepared again.*restore the dataset the run was "
                                            "trained on, or start a new checkpoint.dir"):
        TokenLoader(config(ds)).load_state_dict(state)


def test_skip_corrupt_is_opt_in_counts_and_is_a_recipe_key(ds):
    shard(ds, 1).write_bytes(b"not a tar at all")
    shard(ds, 3, ".crc32").unlink()
    intact5 = shard(ds, 5).read_bytes()
    shard(ds, 5).unlink()
    with pytest.raises(ShardError, match=r"train-000001.tar is 16 bytes.* \(2 more shard\(s\) of split 'train'"):
        TokenLoader(config(ds))  # not without opting in
    loader = TokenLoader(config(ds, skip_corrupt=True))
    assert sorted(loader.skipped_shards) == [str(shard(ds, i)) for i in (1, 3, 5)]
    assert loader.sequences_per_epoch == [75]
    stream = ids(take(loader, 19))[:75]  # one epoch of the 3 good shards
    assert sorted(stream) == [i for s in (0, 2, 4) for i in range(25 * s, 25 * s + 25)]
    state = loader.state_dict()
    assert state["sources"][0]["skipped"] == loader.skipped_shards
    shard(ds, 5).write_bytes(intact5)  # now a different set is bad: resuming must refuse, saying what to do
    shard(ds, 0).unlink()
    with pytest.raises(ManifestError, match=rf"cannot resume on {ds / 'manifest.json'}: data.skip_corrupt leaves out "
                                            rf"other shards .*: restore \['{shard(ds, 0)}'\] and move "
                                            rf"\['{shard(ds, 5)}'\] away again .* or start a new checkpoint.dir"):
        TokenLoader(config(ds, skip_corrupt=True)).load_state_dict(state)
    # what the errors advise exists: data.skip_corrupt is a recipe key (off unless set)
    assert DataConfig(manifests=["m.json"]).skip_corrupt is False
    assert from_dict(DataConfig, {"manifests": ["m.json"], "skip_corrupt": True}, "data").skip_corrupt is True
    with pytest.raises(RecipeError, match="data.skip_corrupt: expected true/false"):
        from_dict(DataConfig, {"manifests": ["m.json"], "skip_corrupt": "yes"}, "data")


def test_old_or_foreign_manifests_are_refused(ds, tmp_path):
    m = json.loads((ds / "manifest.json").read_text())
    old = {**m, "version": 1}
    (tmp_path / "v1.json").write_text(json.dumps(old))
    with pytest.raises(ManifestError, match=r"v1.json is sedd-scale-tokens version 1; this code reads version 2 .*"
                                            "prepare the data again with tools/prepare_data.py"):
        TokenLoader(LoaderConfig([str(tmp_path / "v1.json")], 8, 4))
    m["splits"]["train"]["shards"][2]["num_bytes"] += 512  # a tar in another layout: offsets would be wrong
    (tmp_path / "layout.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="train-000002.tar is 10752 bytes, not the 10240 of the fixed tar layout"):
        Manifest.load(tmp_path / "layout.json")
    m["splits"]["train"]["shards"][2]["path"] = "../elsewhere.tar"
    (tmp_path / "escape.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="shard paths must be relative to the manifest"):
        Manifest.load(tmp_path / "escape.json")


def test_manifest_recipe_mismatch(ds, tmp_path):
    loader = TokenLoader(config(ds))
    loader.check_compatible(50257, 8)
    with pytest.raises(ManifestError, match="vocabulary 50257.*recipe's tokenizer vocabulary is 257 "
                                            r"\(model.num_tokens\)"):
        loader.check_compatible(257, 8)
    with pytest.raises(ManifestError, match="sequences of 8 tokens but the recipe trains on 1024.*--seq-len 1024"):
        loader.check_compatible(50257, 1024)
    loader.check_compatible(50257, 8, tokenizer="gpt2")
    with pytest.raises(ManifestError, match="holds gpt2 .* the recipe's data.tokenizer is byte"):
        loader.check_compatible(50257, 8, tokenizer="byte")
    with pytest.raises(ManifestError, match="holds sequences of 8 tokens, the loader is configured for 16"):
        TokenLoader(LoaderConfig([str(ds / "manifest.json")], seq_len=16, micro_batch=4))
    with pytest.raises(ManifestError, match="fewer than the 200 data-parallel ranks"):
        TokenLoader(config(ds), 0, 200)
    with pytest.raises(ManifestError, match="has no split 'test'"):
        TokenLoader(config(ds, split="test"))
    with pytest.raises(ManifestError, match="does not exist: prepare the data"):
        TokenLoader(LoaderConfig([str(tmp_path / "nope.json")], 8, 4))
    m = json.loads((ds / "manifest.json").read_text())
    m["tokenizer"] = {"name": "byte", "vocab_size": 257, "eos_id": 256, "sha256": None}
    (tmp_path / "byte.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="cannot blend .*byte.json \\(byte .*same tokenizer"):
        TokenLoader(LoaderConfig([str(ds / "manifest.json"), str(tmp_path / "byte.json")], 8, 4))
    m["splits"]["train"]["num_sequences"] += 1
    (tmp_path / "bad.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=f"manifest {tmp_path / 'bad.json'} is invalid"):
        Manifest.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path / "junk.json")


def test_is_current_tells_a_cache_to_prepare_again(ds, tmp_path):
    from sedd_scale.data.manifest import is_current

    assert is_current(ds / "manifest.json")
    m = json.loads((ds / "manifest.json").read_text())
    (tmp_path / "v1.json").write_text(json.dumps({**m, "version": 1}))
    (tmp_path / "junk.json").write_text("{")
    assert not any(is_current(tmp_path / n) for n in ("v1.json", "junk.json", "missing.json"))
