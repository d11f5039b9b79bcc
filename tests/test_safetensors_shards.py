"""Weights above a size are written as safetensors shards with the Hugging Face index, and read back by both the
`safetensors` library and our loaders (consolidated, hub, load_pretrained)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sedd_scale.apps import convert
from sedd_scale.checkpoint import consolidated as cons
from sedd_scale.checkpoint.hub import HubFormatError, read_hub
from sedd_scale.checkpoint.safetensors_shards import (
    INDEX_FILE,
    WEIGHTS_FILE,
    Weights,
    WeightsError,
    parse_size,
    plan_shards,
    write_weights,
)
from sedd_scale.pretrained import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "sedd_reference" / "model_absorb"


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate((10, 300, 20, 20, 5))}  # float32: 4 B each


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1234") == 1234
    for bad in ("five", "-3MB", "0"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_shards_pack_in_key_order_and_an_oversized_tensor_stands_alone():
    # 40, 1200, 80, 80, 20 bytes under a 200-byte limit.
    assert plan_shards(_tensors(), 200) == [["t0"], ["t1"], ["t2", "t3", "t4"]]
    assert plan_shards(_tensors(), 10**6) == [["t0", "t1", "t2", "t3", "t4"]]


def test_written_shards_follow_the_hugging_face_index_and_read_back(tmp_path):
    tensors = _tensors()
    files = write_weights(tensors, tmp_path, max_shard_bytes=200)
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", INDEX_FILE]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 4 * (10 + 300 + 20 + 20 + 5)
    assert index["weight_map"] == {"t0": files[0], "t1": files[1], "t2": files[2], "t3": files[2], "t4": files[2]}
    by_library = {}
    for name in set(index["weight_map"].values()):  # the safetensors library reads each shard on its own
        by_library.update(load_file(str(tmp_path / name)))
    ours = Weights(tmp_path)
    assert set(by_library) == set(ours) == set(tensors)
    for k, t in tensors.items():
        assert torch.equal(by_library[k], t) and torch.equal(ours[k], t)
    assert not (tmp_path / WEIGHTS_FILE).exists()


def test_below_the_limit_one_file(tmp_path):
    assert write_weights(_tensors(), tmp_path) == [WEIGHTS_FILE]
    assert not (tmp_path / INDEX_FILE).exists()


def test_an_index_that_disagrees_with_its_shards_is_refused(tmp_path):
    write_weights(_tensors(), tmp_path, max_shard_bytes=200)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["t4"] = "model-00001-of-00003.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="disagree with model.safetensors.index.json"):
        Weights(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(WeightsError, match="is not valid JSON"):
        Weights(tmp_path)


def test_both_forms_in_one_folder_is_ambiguous(tmp_path):
    write_weights(_tensors(), tmp_path, max_shard_bytes=200)
    write_weights(_tensors(), tmp_path)
    with pytest.raises(WeightsError, match="holds both"):
        Weights(tmp_path)


def test_sharded_consolidated_and_hub_exports_round_trip(tmp_path, release_process_group):
    """The same conversions with and without shards hold the same tensors and config."""
    plain = convert.from_hub(FIXTURE, tmp_path / "plain")
    ours = convert.from_hub(FIXTURE, tmp_path / "ours", max_shard_bytes=200_000)
    assert (ours / INDEX_FILE).is_file() and not (ours / WEIGHTS_FILE).exists()
    assert len(list(ours.glob("model-*-of-*.safetensors"))) > 2
    sharded, single = cons.open_consolidated(ours), cons.open_consolidated(plain)  # every shard checked
    assert set(sharded.weights()) == set(single.weights())
    assert all(torch.equal(sharded.weights()[k], single.weights()[k]) for k in single.weights())

    reference_config, reference = read_hub(FIXTURE)
    hub_dir = convert.to_hub(ours, tmp_path / "hub", max_shard_bytes=200_000)
    assert (hub_dir / INDEX_FILE).is_file()
    config, state = read_hub(hub_dir)
    assert config == read_hub(convert.to_hub(plain, tmp_path / "hub-plain"))[0]
    assert set(state) <= set(reference) and all(torch.equal(state[k], reference[k]) for k in state)
    model, _, _ = load_pretrained(hub_dir, vocab_multiple=1)
    reference_model, _, _ = load_pretrained(FIXTURE, vocab_multiple=1)
    for (name, p), (_, q) in zip(model.named_parameters(), reference_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_damaged_shard_is_named(tmp_path):
    hub_dir = convert.to_hub(convert.from_hub(FIXTURE, tmp_path / "ours"), tmp_path / "hub", max_shard_bytes=200_000)
    shard = sorted(hub_dir.glob("model-*-of-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(HubFormatError, match=shard.name):
        read_hub(hub_dir)


def test_cli_flag_writes_shards(tmp_path):
    out = tmp_path / "ours"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "from-hub", str(FIXTURE),
                           str(out), "--max-shard-size", "200KB"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / INDEX_FILE).is_file()
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "from-hub", str(FIXTURE),
                          str(tmp_path / "x"), "--max-shard-size", "lots"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--max-shard-size" in bad.stderr and not (tmp_path / "x").exists()
