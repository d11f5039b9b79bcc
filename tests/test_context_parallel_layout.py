"""Context and sequence parallelism as recipe keys and layout arithmetic (no processes): what the recipe refuses,
how the layout counts ranks and rows, how a recorded layout without cp compares, and that a CP change on resume is
a layout change (reshard), while sequence parallelism is not."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sedd_scale.checkpoint.sharded import FORMAT, CheckpointError, check_layout, step_name
from sedd_scale.config import Recipe, RecipeError, cli, from_dict, to_dict
from sedd_scale.config.changes import ResumeRefused, check_resume
from sedd_scale.layout import Layout, layout_changes, reshard_args
from sedd_scale.plan import Candidate, candidate_of
from sedd_scale.train import run_dir


def raw(parallel: dict | None = None, n_heads: int = 4, seq_len: int = 32) -> dict:
    """A small recipe (4 heads, 32 positions) with these parallel settings."""
    return {"model": {"hidden_size": 64, "n_heads": n_heads, "n_blocks": 4, "length": seq_len},
            "data": {"manifests": ["d/manifest.json"], "seq_len": seq_len},
            "parallel": {"micro_batch": 2, "global_batch": 8, **(parallel or {})}}


def error_of(data: dict) -> str:
    with pytest.raises(RecipeError) as e:
        from_dict(Recipe, data)
    return str(e.value)


@pytest.mark.parametrize("parallel, message", [
    ({"context_parallel": 0}, "context_parallel must be >= 1, got 0"),
    ({"context_parallel": 8}, "parallel.context_parallel=8 with tp=1: attention splits model.n_heads=4 over "
                              "tp x context_parallel = 8 ranks, which does not divide it: choose context_parallel "
                              "among [1, 2, 4]"),
    ({"tp": 2, "context_parallel": 4}, "tp x context_parallel = 8 ranks, which does not divide it: choose "
                                       "context_parallel among [1, 2]"),
    ({"sequence_parallel": True}, "it needs tp > 1"),
])
def test_impossible_context_and_sequence_parallel_settings_are_refused_naming_the_choices(parallel, message):
    assert message in error_of(raw(parallel))


def test_sequence_lengths_must_split_over_the_ranks_that_share_them():
    # CP splits positions over CP ranks; SP splits them over TP x CP ranks
    message = error_of(raw({"context_parallel": 2}, n_heads=4, seq_len=9))
    assert "parallel.context_parallel=2 does not divide data.seq_len=9: choose context_parallel among [1]" in message
    message = error_of(raw({"tp": 2, "context_parallel": 2, "sequence_parallel": True}, n_heads=4, seq_len=18))
    assert "sequence_parallel splits data.seq_len=18 over tp x context_parallel = 2*2 = 4 ranks" in message
    ok = from_dict(Recipe, raw({"tp": 2, "context_parallel": 2, "sequence_parallel": True}, n_heads=4, seq_len=16))
    assert ok.parallel.sequence_parallel and ok.parallel.context_parallel == 2


def test_a_cp_layout_counts_cp_ranks_in_the_world_but_not_in_the_batch():
    r = from_dict(Recipe, raw({"tp": 2, "context_parallel": 2}))
    lay = r.layout(8)  # 8 = TP 2 x CP 2 x DP 2: CP ranks share their DP rank's rows
    assert (lay.tp, lay.cp, lay.pp, lay.dp, lay.grad_accum, lay.data_group_size) == (2, 2, 1, 2, 2, 4)
    assert lay.row_offset(1, 1) == 1 * 2 * 2 + 1 * 2  # rows follow the pure DP rank, as without CP
    assert lay.describe() == ("world 8 = TP 2 x CP 2 x PP 1 x DP 2 | ZeRO-1 over DP x CP 4 | "
                              "batch 8 = micro 2 x DP 2 x grad accum 2")
    with pytest.raises(RecipeError, match=re.escape("world size 6 is not divisible by tp*cp*pp = 2*2*1 = 4: "
                                                    "launch a multiple of 4 processes")):
        r.layout(6)
    with pytest.raises(ValueError, match=re.escape("tp*cp*pp*dp = 1*2*1*2 != world size 2")):
        Layout(2, 1, 1, 2, 1, 1, 2, 1, cp=2)
    with pytest.raises(ValueError, match="needs tp > 1"):
        Layout(2, 1, 1, 2, 1, 1, 2, 1, sp=True)
    sp = from_dict(Recipe, raw({"tp": 2, "sequence_parallel": True})).layout(2)
    assert sp.sp and sp.describe().startswith("world 2 = TP 2 (+SP) x PP 1 x DP 1 |")


def test_the_recipe_tool_shows_cp_and_sp_in_its_layout_line(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(raw({"tp": 2, "context_parallel": 2, "sequence_parallel": True})))
    assert cli.main([str(path), "--world-size", "8"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("layout:"))
    assert line.startswith("layout: world 8 = TP 2 (+SP) x CP 2 x PP 1 x DP 2 | ZeRO-1 over DP x CP 4"), line


def test_a_recorded_layout_without_cp_is_cp_1_and_a_cp_change_needs_a_reshard():
    old = {"tp": 2, "pp": 1, "dp": 2, "zero_stage": 1}  # written before context parallelism
    lay = Layout.resolve(4, tp=2, pp=1, zero_stage=1, micro_batch=1, global_batch=2)
    assert lay.as_dict() == old and layout_changes(old, lay.as_dict()) == {}  # a CP-1 layout records what it did
    cp2 = Layout.resolve(8, tp=2, pp=1, zero_stage=1, micro_batch=1, global_batch=2, cp=2)
    assert cp2.as_dict() == {"tp": 2, "cp": 2, "pp": 1, "dp": 2, "zero_stage": 1}
    assert layout_changes(old, cp2.as_dict()) == {"cp": (1, 2)}
    assert layout_changes(cp2.as_dict(), old) == {"cp": (2, 1)}  # a CP checkpoint resumed at CP 1
    check_layout({"layout": old}, lay.as_dict())
    with pytest.raises(CheckpointError, match=re.escape("cp: saved 2 vs now 1")) as e:
        check_layout({"layout": cp2.as_dict(), "step": 3}, lay.as_dict())
    assert "convert_checkpoint.py reshard RUN_DIR NEW_RUN_DIR --tp 2 --pp 1 --dp 2 --zero-stage 1" in str(e.value)
    assert reshard_args(cp2.as_dict()) == "--tp 2 --cp 2 --pp 1 --dp 2 --zero-stage 1"


def test_the_planner_candidate_still_builds_and_carries_cp():
    c = Candidate.of(2, 1, 2, 1, 2, 1, True)  # positional, as the planner builds them
    assert (c.cp, c.recompute, c.world_size) == (1, True, 4)
    r = from_dict(Recipe, raw({"tp": 2, "context_parallel": 2}))
    assert candidate_of(r, r.layout(8)).cp == 2


def _fake_checkpoint(run: Path, data: dict, layout: dict) -> None:
    folder = run / step_name(3)
    folder.mkdir(parents=True)
    meta = {"format": FORMAT, "step": 3, "recipe": to_dict(from_dict(Recipe, data)), "files": {}, "layout": layout}
    (folder / "meta.json").write_text(json.dumps(meta))
    (run / "latest").write_text(folder.name)


def test_resume_under_another_cp_is_refused_with_the_reshard_command_and_sp_is_taken(tmp_path):
    run = tmp_path / "run"
    cp1 = raw({"tp": 2, "zero_stage": 1}, seq_len=32)
    cp1["checkpoint"] = {"dir": str(run)}
    _fake_checkpoint(run, cp1, {"tp": 2, "pp": 1, "dp": 2, "zero_stage": 1})  # an older checkpoint: no cp key
    cp2 = {**cp1, "parallel": {**cp1["parallel"], "context_parallel": 2}}
    with pytest.raises(ResumeRefused) as e:
        run_dir.check_start(from_dict(Recipe, cp2), 4)  # world 4 = TP 2 x CP 2 x DP 1
    message = str(e.value)
    assert "layout cp: saved 1, now 2" in message and "layout dp: saved 2, now 1" in message, message
    assert f"reshard {run} NEW_DIR --tp 2 --cp 2 --pp 1 --dp 1 --zero-stage 1" in message, message
    assert "parallel.context_parallel" not in message  # compared as the layout, not refused as a setting
    sp = {**cp1, "parallel": {**cp1["parallel"], "sequence_parallel": True}}
    applied = run_dir.check_start(from_dict(Recipe, sp), 4).changes
    assert [c.describe() for c in applied] == ["parallel.sequence_parallel: saved False, now True"]
    same = check_resume(to_dict(from_dict(Recipe, cp2)), to_dict(from_dict(Recipe, cp2)),
                        {"tp": 2, "cp": 2, "pp": 1, "dp": 1, "zero_stage": 1},
                        from_dict(Recipe, cp2).layout(4).as_dict(), checkpoint="c", run_dir="r")
    assert same == []
