"""The training checkpoint folder protocol: atomic commit with checksums, latest pointer, pruning, rollback,
layout checks, verified reads."""
import json

import pytest
import torch

from sedd_scale.checkpoint.files import read_verified, write_files
from sedd_scale.checkpoint.sharded import FILES_DIR, CheckpointDir, CheckpointError, check_layout, read_meta


def write_step(ckpt: CheckpointDir, step: int, payload: str, ranks: int = 1, meta: dict | None = None):
    """What every rank's writer does (its files and its list), then rank 0's commit."""
    staging = ckpt.staging(step, "test")
    for rank in range(ranks):
        records = write_files(staging, [(staging / f"rank_{rank:05d}.pt", {"payload": payload, "rank": rank})])
        (staging / FILES_DIR).mkdir(parents=True, exist_ok=True)
        (staging / FILES_DIR / f"rank_{rank:05d}.json").write_text(json.dumps(records))
    return ckpt.commit(staging, step, meta or {}, ranks)


def test_commit_records_every_file_latest_and_keep_last(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep_last=2)
    assert ckpt.latest() is None
    for step in (10, 20, 30):
        write_step(ckpt, step, f"s{step}", ranks=2, meta={"layout": {"tp": 1}})
        ckpt.prune()
    assert ckpt.latest().name == "step_000000030"
    assert [p.name for p in ckpt.steps()] == ["step_000000020", "step_000000030"]
    meta = read_meta(ckpt.latest())
    assert meta["step"] == 30 and sorted(meta["files"]) == ["rank_00000.pt", "rank_00001.pt"]
    assert meta["bytes"] == sum(r["bytes"] for r in meta["files"].values())
    assert not (ckpt.latest() / FILES_DIR).exists()
    state = read_verified(ckpt.latest() / "rank_00001.pt", meta["files"]["rank_00001.pt"], fix="(fix)")
    assert state == {"payload": "s30", "rank": 1}


def test_a_missing_rank_list_is_not_committed(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    write_step(ckpt, 1, "good")
    staging = ckpt.staging(2, "test")
    write_files(staging, [(staging / "rank_00000.pt", {"x": 1})])  # the rank died before listing its files
    with pytest.raises(CheckpointError, match="file lists from 0 of 1 ranks"):
        ckpt.commit(staging, 2, {}, 1)
    assert ckpt.latest().name == "step_000000001"
    assert [p.name for p in ckpt.clean_stale()] == [staging.name] and not staging.exists()


def test_resaving_a_step_replaces_it(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    write_step(ckpt, 5, "old")
    write_step(ckpt, 5, "new")
    meta = read_meta(ckpt.latest())
    assert read_verified(ckpt.latest() / "rank_00000.pt", meta["files"]["rank_00000.pt"], fix="")["payload"] == "new"


def test_roll_back_keeps_the_newer_folders_aside(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep_last=5)
    for step in (2, 4, 6):
        write_step(ckpt, step, f"s{step}")
    assert ckpt.roll_back(1) is None and ckpt.latest().name == "step_000000006"  # nothing old enough: unchanged
    assert ckpt.roll_back(4).name == "step_000000004" and ckpt.latest().name == "step_000000004"
    assert sorted(p.name for p in tmp_path.glob("diverged-*")) == ["diverged-step_000000006"]
    write_step(ckpt, 6, "again")  # the resumed run writes step 6 anew
    assert ckpt.latest().name == "step_000000006"


def test_damaged_files_are_named(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    final = write_step(ckpt, 1, "x" * 1000)
    record = read_meta(final)["files"]["rank_00000.pt"]
    path = final / "rank_00000.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint file {path} is damaged.*use step 0"):
        read_verified(path, record, fix="use step 0")
    path.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(CheckpointError, match="100 bytes with sha256"):
        read_verified(path, record, fix="")
    with pytest.raises(CheckpointError, match="not among the files recorded"):
        read_verified(path, None, fix="")


def test_bad_checkpoints_give_clear_errors(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    write_step(ckpt, 1, "x", meta={"layout": {"tp": 2, "pp": 1, "dp": 2, "zero_stage": 1}})
    meta = read_meta(ckpt.latest())
    check_layout(meta, {"tp": 2, "pp": 1, "dp": 2, "zero_stage": 1})
    with pytest.raises(CheckpointError, match=r"tp: saved 2 vs now 4.*convert_checkpoint"):
        check_layout(meta, {"tp": 4, "pp": 1, "dp": 2, "zero_stage": 1})
    (tmp_path / "latest").write_text("step_000000099")
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        ckpt.latest()
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(CheckpointError, match="no meta.json"):
        read_meta(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="format 'other'"):
        read_meta(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "meta.json").write_text(json.dumps({"format": "sedd-scale/train-v1"}))
    with pytest.raises(CheckpointError, match="older sedd-scale"):
        read_meta(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="damaged"):
        read_meta(tmp_path / "elsewhere")


def test_a_failed_write_names_the_directory_and_the_free_space(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint file .*rank_00000.pt .*No space left.*"
                                              r"GiB free and this rank still had"):
        write_files(tmp_path / "staging", [(tmp_path / "staging" / "rank_00000.pt", {"t": torch.zeros(10)})])
