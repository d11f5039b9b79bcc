"""The training checkpoint folder protocol: atomic commit with checksums, latest pointer, pruning, rollback,
layout checks, verified reads."""
import errno
import json
import os
import resource
import shutil
from pathlib import Path

import pytest
import torch

from sedd_scale.checkpoint.files import read_verified, write_files
from sedd_scale.checkpoint.sharded import FILES_DIR, CheckpointDir, CheckpointError, check_layout, read_meta, step_name


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


def _failing_write(code: int):
    """`HashingWriter.__init__` over a file whose writes fail with `code` once some bytes went through, as write(2)
    does on a filling disk (torch's writer turns the OSError into a RuntimeError without the errno)."""
    from sedd_scale.checkpoint import files

    real = files.HashingWriter.__init__

    class Failing:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data) -> int:
            if self.written > 100:
                raise OSError(code, os.strerror(code))
            self.written += len(data)
            return self.f.write(data)

        def flush(self) -> None:
            self.f.flush()

    def init(self, f):
        real(self, Failing(f))

    return init


def test_a_full_disk_names_the_directory_and_the_free_space_needed(tmp_path, monkeypatch):
    from sedd_scale.checkpoint import files

    monkeypatch.setattr(files.HashingWriter, "__init__", _failing_write(errno.ENOSPC))
    path = tmp_path / "staging" / "rank_00000.pt"
    with pytest.raises(CheckpointError) as e:
        write_files(tmp_path / "staging", [(path, {"t": torch.zeros(10)})])
    message = str(e.value)
    assert f"could not write checkpoint file {path}: the filesystem of {tmp_path} is full (ENOSPC" in message, message
    assert "GiB free and this rank still had 0.00 GiB to write: free at least that much" in message, message
    assert "ulimit" not in message and "the previous checkpoint stays `latest`" in message, message


def test_a_file_size_limit_is_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    """EFBIG under `ulimit -f` (RLIMIT_FSIZE): the limit is named, not the free space as if the disk were full."""
    from sedd_scale.checkpoint import files

    monkeypatch.setattr(files.HashingWriter, "__init__", _failing_write(errno.EFBIG))
    monkeypatch.setattr(resource, "getrlimit", lambda which: (4096, resource.RLIM_INFINITY))
    path = tmp_path / "staging" / "rank_00000.pt"
    with pytest.raises(CheckpointError) as e:
        write_files(tmp_path / "staging", [(path, {"t": torch.zeros(10)})])
    message = str(e.value)
    assert f"could not write checkpoint file {path}: it reached this process's file-size limit, 4096 bytes" in message
    assert "`ulimit -f` shows 4" in message and "not a full disk" in message and "ulimit -f unlimited" in message
    assert "is full" not in message and "still had" not in message, message
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    with pytest.raises(CheckpointError, match=f"{path}: it is larger than the filesystem of {tmp_path} allows"):
        write_files(tmp_path / "staging", [(path, {"t": torch.zeros(10)})])


def _resave_interrupted(tmp_path, latest_step: int = 5) -> tuple[CheckpointDir, Path, Path]:
    """The state a crash leaves between a re-save's two renames: step 5 set aside, its new copy still staged."""
    ckpt = CheckpointDir(tmp_path, keep_last=5)
    write_step(ckpt, 4, "four")
    write_step(ckpt, 5, "old")
    ckpt.point_latest(tmp_path / step_name(latest_step))
    final = tmp_path / step_name(5)
    aside = tmp_path / f".tmp-old-{final.name}-1765000000000000000"
    os.rename(final, aside)  # the first rename of commit(); the crash comes before the second
    staging = ckpt.staging(5, "crashed")
    write_files(staging, [(staging / "rank_00000.pt", {"payload": "new", "rank": 0})])
    return ckpt, final, aside


def test_a_re_save_interrupted_between_its_renames_loses_nothing(tmp_path):
    ckpt, final, aside = _resave_interrupted(tmp_path)
    with pytest.raises(CheckpointError, match=f"intact copy is {aside}.*mv {aside} {final}"):
        ckpt.latest()  # what tools that do not start training say
    assert ckpt.latest(set_aside_ok=True) == aside  # what a training start reads its plan from
    removed = ckpt.clean_stale()  # a training start, under the run lock
    assert aside not in removed and [p.name for p in removed] == [".tmp-step_000000005-crashed"], removed
    assert ckpt.latest() == final and not aside.exists()
    meta = read_meta(final)
    assert read_verified(final / "rank_00000.pt", meta["files"]["rank_00000.pt"], fix="")["payload"] == "old"


def test_a_set_aside_step_that_latest_does_not_name_is_put_back_too(tmp_path):
    ckpt, final, aside = _resave_interrupted(tmp_path, latest_step=4)  # e.g. `latest` pointed back by hand
    assert ckpt.latest().name == step_name(4)
    assert ckpt.restore_set_aside() == [final] and (final / "meta.json").is_file() and not aside.exists()
    assert ckpt.clean_stale() == [ckpt.staging(5, "crashed")]
    assert [p.name for p in ckpt.steps()] == [step_name(4), step_name(5)]


def test_an_old_copy_whose_replacement_was_committed_is_removed(tmp_path):
    """A crash after both renames: the new step folder is in place, the old copy is what the commit was deleting."""
    ckpt = CheckpointDir(tmp_path)
    write_step(ckpt, 5, "old")
    aside = tmp_path / ".tmp-old-step_000000005-1765000000000000000"
    shutil.copytree(tmp_path / step_name(5), aside)
    write_step(ckpt, 5, "new")
    assert ckpt.restore_set_aside() == [] and ckpt.clean_stale() == [aside]
    meta = read_meta(ckpt.latest())
    assert read_verified(ckpt.latest() / "rank_00000.pt", meta["files"]["rank_00000.pt"], fix="")["payload"] == "new"


def test_a_step_records_meta_json_in_sha256sums_and_checks_it_first(tmp_path):
    """meta.json is checked before it is parsed: a flipped byte anywhere in it, or in SHA256SUMS, is named."""
    ckpt = CheckpointDir(tmp_path)
    final = write_step(ckpt, 1, "x", ranks=2)
    sums = (final / "SHA256SUMS").read_text().splitlines()
    assert sorted(line.split("  ")[1] for line in sums) == ["meta.json", "rank_00000.pt", "rank_00001.pt"]
    for name in ("meta.json", "SHA256SUMS"):
        path = final / name
        size = path.stat().st_size
        for where in sorted({0, 1, size // 3, size // 2, 2 * size // 3, size - 2, size - 1}):
            original = path.read_bytes()
            flipped = bytearray(original)
            flipped[where] ^= 0x40
            path.write_bytes(bytes(flipped))
            with pytest.raises(CheckpointError, match=f"{path} is (damaged|missing)") as e:
                read_meta(final)
            assert "restore the step folder from a copy" in str(e.value), (name, where, str(e.value))
            path.write_bytes(original)
    (final / "SHA256SUMS").unlink()
    with pytest.raises(CheckpointError, match=f"{final / 'SHA256SUMS'} is missing"):
        read_meta(final)
