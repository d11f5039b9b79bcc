"""The training checkpoint folder protocol: atomic commit, latest pointer, pruning, layout checks."""
import json

import pytest

from sedd_scale.checkpoint.sharded import CheckpointDir, CheckpointError, check_layout, read_meta


def writer(payload):
    def write(folder):
        (folder / "rank_00000.pt").write_text(payload)
    return write


def test_save_commit_latest_and_keep_last(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep_last=2)
    assert ckpt.latest() is None
    for step in (10, 20, 30):
        ckpt.save(step, writer(f"s{step}"), {"layout": {"tp": 1}})
    assert ckpt.latest().name == "step_000000030"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000000020", "step_000000030"]
    assert read_meta(ckpt.latest())["step"] == 30
    assert (ckpt.latest() / "rank_00000.pt").read_text() == "s30"


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep_last=3)
    ckpt.save(1, writer("good"), {})

    def crash(folder):
        (folder / "rank_00000.pt").write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.save(2, crash, {})
    assert ckpt.latest().name == "step_000000001"
    assert (ckpt.latest() / "rank_00000.pt").read_text() == "good"
    ckpt.save(3, writer("next"), {})  # the stale staging folder of step 2 is cleared
    assert not list(tmp_path.glob(".tmp-*"))
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000000001", "step_000000003"]


def test_resaving_a_step_replaces_it(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    ckpt.save(5, writer("old"), {})
    ckpt.save(5, writer("new"), {})
    assert (ckpt.latest() / "rank_00000.pt").read_text() == "new"


def test_bad_checkpoints_give_clear_errors(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    ckpt.save(1, writer("x"), {"layout": {"tp": 2, "pp": 1, "dp": 2, "zero_stage": 1}})
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
