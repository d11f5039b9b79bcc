"""Bad data fails early with an error naming the file and the fix; skip_corrupt is opt-in and counted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sedd_scale.data.loader import EvalLoader, LoaderConfig, TokenLoader
from sedd_scale.data.manifest import Manifest, ManifestError, ShardInfo
from sedd_scale.data.shards import ShardError, read_shard
from tests.test_data_loader import ids, make_dataset, take


@pytest.fixture()
def ds(tmp_path) -> Path:
    """A fresh 6-shard dataset (25 sequences per shard) the test may damage."""
    make_dataset(tmp_path / "d", 150, seqs_per_shard=25, valid=10)
    return tmp_path / "d"


def shard(ds: Path, i: int) -> Path:
    return ds / f"train-{i:06d}.tar"


def config(ds: Path, **kw) -> LoaderConfig:
    return LoaderConfig([str(ds / "manifest.json")], seq_len=8, micro_batch=4, **kw)


def test_truncated_shard_is_refused_at_start(ds):
    path = shard(ds, 2)
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(ShardError, match=f"shard {path} is 1500 bytes but the manifest says .*truncated"):
        TokenLoader(config(ds))


def test_corrupt_bytes_fail_sha256_naming_the_shard(ds):
    path = shard(ds, 0)
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first sample's tokens: size unchanged
    path.write_bytes(bytes(data))
    loader = TokenLoader(config(ds))  # sizes are fine; the hash is checked when the shard is read
    with pytest.raises(ShardError, match=f"sha256 mismatch for shard {path}"):
        take(loader, 40)  # 38 batches = one epoch: every shard gets read
    with pytest.raises(ShardError, match="sha256 mismatch"):  # the same error through a DataLoader worker
        take(TokenLoader(config(ds, num_workers=2)), 40)


def test_broken_tar_structure_is_reported(ds):
    manifest = Manifest.load(ds / "manifest.json")
    info = manifest.splits["train"].shards[1]
    path = shard(ds, 1)
    data = bytearray(path.read_bytes())
    data[100:108] = b"garbage!"  # the first header's mode/checksum field
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"shard {path} is not a readable tar"):
        read_shard(path, info, 8, "uint16", verify=False)
    cut = path.read_bytes()[:2048]  # a truncated tar whose size the manifest agrees with
    path.write_bytes(cut)
    with pytest.raises(ShardError, match=str(path)):
        read_shard(path, ShardInfo(info.path, info.num_sequences, len(cut), info.sha256), 8, "uint16", verify=False)


def test_missing_shard_is_refused_at_start(ds):
    shard(ds, 4).unlink()
    with pytest.raises(ShardError, match=f"missing shard {shard(ds, 4)}"):
        TokenLoader(config(ds))
    (ds / "valid-000000.tar").unlink()
    with pytest.raises(ShardError, match="missing shard .*valid-000000.tar"):
        EvalLoader(str(ds / "manifest.json"), "valid", 4)


def test_skip_corrupt_is_opt_in_and_counts(ds):
    shard(ds, 1).write_bytes(b"not a tar at all")
    data = bytearray(shard(ds, 3).read_bytes())
    data[900] ^= 1
    shard(ds, 3).write_bytes(bytes(data))
    intact5 = shard(ds, 5).read_bytes()
    shard(ds, 5).unlink()
    with pytest.raises(ShardError, match="train-000001.tar is 16 bytes"):
        TokenLoader(config(ds))  # not without opting in
    loader = TokenLoader(config(ds, skip_corrupt=True))
    assert sorted(loader.skipped_shards) == [str(shard(ds, i)) for i in (1, 3, 5)]
    assert loader.sequences_per_epoch == [75]
    stream = ids(take(loader, 19))[:75]  # one epoch of the 3 good shards
    assert sorted(stream) == [i for s in (0, 2, 4) for i in range(25 * s, 25 * s + 25)]
    state = loader.state_dict()
    shard(ds, 5).write_bytes(intact5)  # now a different set is bad: resuming must refuse
    with pytest.raises(ValueError, match="different set of corrupt shards"):
        TokenLoader(config(ds, skip_corrupt=True)).load_state_dict(state)


def test_manifest_recipe_mismatch(ds, tmp_path):
    loader = TokenLoader(config(ds))
    loader.check_compatible(50257, 8)
    with pytest.raises(ManifestError, match="vocabulary 50257.*recipe's tokenizer vocabulary is 257"):
        loader.check_compatible(257, 8)
    with pytest.raises(ManifestError, match="sequences of 8 tokens but the recipe trains on 1024.*--seq-len 1024"):
        loader.check_compatible(50257, 1024)
    with pytest.raises(ManifestError, match="holds sequences of 8 tokens, the loader is configured for 16"):
        TokenLoader(LoaderConfig([str(ds / "manifest.json")], seq_len=16, micro_batch=4))
    with pytest.raises(ManifestError, match="fewer than the 200 data-parallel ranks"):
        TokenLoader(config(ds), 0, 200)
    with pytest.raises(ManifestError, match="has no split 'test'"):
        TokenLoader(config(ds, split="test"))
    with pytest.raises(ManifestError, match="does not exist: prepare the data"):
        TokenLoader(LoaderConfig([str(tmp_path / "nope.json")], 8, 4))
    m = json.loads((ds / "manifest.json").read_text())
    m["tokenizer"] = {"name": "byte", "vocab_size": 257, "eos_id": 256}
    (tmp_path / "byte.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="cannot blend .*same tokenizer"):
        TokenLoader(LoaderConfig([str(ds / "manifest.json"), str(tmp_path / "byte.json")], 8, 4))
    m["splits"]["train"]["num_sequences"] += 1
    (tmp_path / "bad.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=f"manifest {tmp_path / 'bad.json'} is invalid"):
        Manifest.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path / "junk.json")
