"""Consolidated <-> hub conversion on the reference fixture, and conversions refusing bad input
before any work (one process; the multi-process conversions are in test_convert.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sedd_scale.apps import convert
from sedd_scale.checkpoint import consolidated as cons
from sedd_scale.checkpoint import full_state
from sedd_scale.checkpoint.sharded import FORMAT as TRAIN_FORMAT
from sedd_scale.checksums import write_sums
from sedd_scale.model.config import ModelConfig
from tests.test_trainer import recipe_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "sedd_reference" / "model_absorb"


def tiny_consolidated(path: Path, *, recipe: dict | None = None, seed: int = 0) -> Path:
    """A consolidated directory with random weights of the test trainer's model."""
    data = recipe_dict(str(path) + "-run") if recipe is None else recipe
    cfg = ModelConfig(**data["model"])
    gen = torch.Generator().manual_seed(seed)
    weights = {k: 0.1 * torch.randn(s, generator=gen) for k, s in cons.expected_shapes(cfg).items()}
    return cons.write(path, cfg, {"type": "loglinear", "eps": 1e-3}, weights, which="raw",
                      provenance={"recipe": data})


def test_hub_fixture_round_trips_bitwise(tmp_path):
    back = convert.from_hub(FIXTURE, tmp_path / "ours")
    ckpt = cons.open_consolidated(back)
    assert ckpt.config["weights"] == "hub" and ckpt.noise == {"type": "loglinear", "eps": 1e-3}
    convert.to_hub(back, tmp_path / "hub")
    original = load_file(str(FIXTURE / "model.safetensors"))
    again = load_file(str(tmp_path / "hub" / "model.safetensors"))
    assert set(original) == set(again)
    for key, value in original.items():
        assert torch.equal(value.float(), again[key]), key
    want = json.loads((FIXTURE / "config.json").read_text())
    got = json.loads((tmp_path / "hub" / "config.json").read_text())
    for section in ("tokens", "graph", "model"):
        assert got[section] == want[section], section
    assert got["noise"]["type"] == want["noise"]["type"]


def test_consolidated_refuses_foreign_tensors_and_missing_files(tmp_path):
    path = tiny_consolidated(tmp_path / "c")
    weights = load_file(str(path / "model.safetensors"))
    weights["blocks.0.attn_qkv.weight"] = weights["blocks.0.attn_qkv.weight"][:-1]
    del weights["output_layer.linear.bias"]
    weights["extra.weight"] = torch.zeros(1)
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(cons.ConsolidatedError, match="model.safetensors is damaged: its sha256"):
        cons.open_consolidated(path)  # SHA256SUMS: the file is not the one that was written
    write_sums(path)  # as if written so: the tensors themselves are checked
    with pytest.raises(cons.ConsolidatedError) as e:
        cons.open_consolidated(path)
    for word in ("missing", "output_layer.linear.bias", "unexpected", "extra.weight", "mis-shaped", "attn_qkv"):
        assert word in str(e.value)
    (path / "model.safetensors").unlink()
    with pytest.raises(cons.ConsolidatedError, match="model.safetensors is missing"):
        cons.open_consolidated(path)
    with pytest.raises(cons.ConsolidatedError, match="holds model weights only"):
        cons.Consolidated(tiny_consolidated(tmp_path / "d"), {}).counters()


def test_conversions_refuse_bad_requests_before_any_work(tmp_path):
    source = tiny_consolidated(tmp_path / "c")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(convert.ConversionError, match="exists"):
        convert.shard(source, taken, tp=2)
    assert (taken / "keep.txt").read_text() == "mine"  # nothing overwritten
    with pytest.raises(Exception, match="tp=3"):  # 3 does not divide the 4 heads
        convert.shard(source, tmp_path / "o1", tp=3)
    with pytest.raises(Exception, match="pp=3"):  # nor the 2 blocks
        convert.shard(source, tmp_path / "o2", pp=3)
    with pytest.raises(convert.ConversionError, match="global_batch"):
        convert.shard(source, tmp_path / "o3", dp=3)
    other = recipe_dict(str(tmp_path / "r"))
    other["model"]["hidden_size"] = 64
    recipe_file = tmp_path / "other.yaml"
    recipe_file.write_text(json.dumps(other))  # JSON is YAML
    with pytest.raises(convert.ConversionError, match="hidden_size"):
        convert.shard(source, tmp_path / "o4", recipe=recipe_file)
    weights_only = convert.from_hub(FIXTURE, tmp_path / "from-hub")
    with pytest.raises(convert.ConversionError, match="--recipe"):
        convert.shard(weights_only, tmp_path / "o5")
    assert not [p for p in tmp_path.iterdir() if p.name.lstrip(".").startswith(("o1", "o2", "o3", "o4", "o5"))]


def test_conversions_create_missing_parent_folders_of_their_outputs(tmp_path):
    source = tiny_consolidated(tmp_path / "c")
    assert convert.to_hub(source, tmp_path / "hub" / "cpu-tiny") == tmp_path / "hub" / "cpu-tiny"
    assert cons.open_consolidated(convert.from_hub(tmp_path / "hub" / "cpu-tiny", tmp_path / "x" / "y" / "back"))
    assert convert.shard(source, tmp_path / "runs" / "new" / "run", tp=2)["out"] == str(tmp_path / "runs/new/run")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(convert.ConversionError, match=f"{tmp_path / 'file'} is a file, not a directory"):
        convert.to_hub(source, tmp_path / "file" / "hub")
    assert (tmp_path / "file").read_text() == "mine"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "to-hub", str(source),
                          "hub2/cpu-tiny"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "hub2" / "cpu-tiny" / "model.safetensors").is_file()


def test_a_hub_directory_without_sha256sums_is_read_with_a_note(tmp_path, capsys):
    """The reference's own hub format has no SHA256SUMS: its files are used unverified, and that is said once."""
    from sedd_scale.pretrained import read_weights

    read_weights(FIXTURE)
    err = capsys.readouterr().err
    assert f"note: {FIXTURE} has no SHA256SUMS" in err and "its files were not verified" in err, err
    assert err.count("note: ") == 1, err
    ours = convert.to_hub(tiny_consolidated(tmp_path / "c"), tmp_path / "hub")  # our export has one: no note
    capsys.readouterr()
    read_weights(ours)
    assert "note: " not in capsys.readouterr().err
    (ours / "SHA256SUMS").unlink()
    read_weights(ours)
    assert f"note: {ours} has no SHA256SUMS" in capsys.readouterr().err


def test_a_damaged_hub_directory_without_sha256sums_names_the_file(tmp_path):
    from sedd_scale.checkpoint.hub import HubFormatError
    from sedd_scale.pretrained import read_weights

    hub = convert.to_hub(tiny_consolidated(tmp_path / "c"), tmp_path / "hub")
    (hub / "SHA256SUMS").unlink()
    config = (hub / "config.json").read_text()
    (hub / "config.json").write_text(config.replace(":", ";", 1))  # JSON syntax: only the parser can tell
    with pytest.raises(cons.ConsolidatedError, match=f"{hub / 'config.json'} is not valid JSON"):
        read_weights(hub)
    (hub / "config.json").write_text(config)
    (hub / "model.safetensors").write_bytes((hub / "model.safetensors").read_bytes()[:100])
    with pytest.raises(HubFormatError, match=f"{hub / 'model.safetensors'} is not a readable safetensors file"):
        read_weights(hub)


def test_incomplete_training_checkpoint_is_refused(tmp_path):
    step = tmp_path / "run" / "step_000000004"
    (step / "deepspeed").mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"format": TRAIN_FORMAT, "step": 4, "world_size": 2,
                                                "layout": {"tp": 2}, "recipe": recipe_dict(str(tmp_path))}))
    (step / "rank_00000.pt").write_bytes(b"")
    (tmp_path / "run" / "latest").write_text(step.name)
    with pytest.raises(convert.ConversionError, match=r"rank_00001\.pt.*deepspeed"):
        convert.consolidate(tmp_path / "run", tmp_path / "out")
    with pytest.raises(convert.ConversionError, match="neither"):
        convert.consolidate(tmp_path, tmp_path / "out")
    from sedd_scale.checkpoint.hub import HubFormatError
    from sedd_scale.pretrained import load_pretrained

    for path in (tmp_path / "run", step):  # the inference loader points at the conversion
        with pytest.raises(HubFormatError, match="convert_checkpoint.py consolidate"):
            load_pretrained(path)


def test_differences_catch_any_changed_bit():
    tensors = {c: {"w": torch.arange(4.0)} for c in full_state.CATEGORIES}
    a = full_state.FullState(tensors, {"step": 3, "loader": {"s": 1}})
    b = full_state.FullState({c: {"w": w.clone() for w in ts.values()} for c, ts in tensors.items()},
                             {"step": 3, "loader": {"s": 1}})
    assert full_state.differences(a, b) == []
    b.tensors["exp_avg_sq"]["w"] = torch.arange(4.0).nextafter(torch.tensor(10.0))
    b.counters["loader"] = {"s": 2}
    found = full_state.differences(a, b)
    assert any(f.startswith("exp_avg_sq/w") for f in found) and any("counter loader" in f for f in found)


def test_cli_exits_2_with_the_reason(tmp_path):
    source = tiny_consolidated(tmp_path / "c")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "shard", str(source),
                          str(tmp_path / "out"), "--tp", "3"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "tp=3" in run.stderr, run.stderr
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "describe", str(source)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = "\n" + run.stdout
    summary = json.loads(out[out.rindex("\n{\n"):])  # after DeepSpeed's own log lines
    assert summary["kind"] == "consolidated" and summary["weights"] == "raw"
