"""benchmarks/gpu_check.py works before a GPU sees it: its CPU mode runs every row on tiny shapes, in parts whose time
budgets are enforced."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_gpu_check_quick_mode_passes_every_row_on_cpu(tmp_path):
    started = time.monotonic()
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--work",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})
    took = time.monotonic() - started
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = p.stdout[p.stdout.index("gpu_check on cpu (quick)"):].splitlines()[1:]
    rows = {line.split()[0]: line for line in table if line.strip()}
    assert set(rows) == {"train-fp32", "train-bf16-mixed", "train-bf16-pp2", "resume", "convert", "planner-memory",
                         "step-small", "step-medium", "loss", "sampler"}, table
    assert all(" PASS " in line for line in rows.values()), table
    assert took < 300, f"quick mode took {took:.0f} s (budget: 5 minutes)"


def test_every_row_is_in_one_part_of_at_most_five_minutes():
    listed = [row for part in gpu_check.PARTS.values() for row in part.rows]
    assert sorted(listed) == sorted(gpu_check.ROWS)  # each row once
    assert all(0 < part.budget_s <= 300 for part in gpu_check.PARTS.values())
    for row, need in gpu_check.NEEDS.items():  # a row runs after the row whose run it reads, in the same part
        part = next(p.rows for p in gpu_check.PARTS.values() if row in p.rows)
        assert need in part and part.index(need) < part.index(row)
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--list-parts"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.count("part ") == len(gpu_check.PARTS), out.stdout


def test_a_part_stops_at_its_budget(tmp_path, monkeypatch):
    """A row that runs past the part's budget is stopped (in-process work too) and fails, and so do the rows after
    it; a row's subprocess gets at most what is left of the budget."""
    seen = {}

    def slow(s, manifest):
        seen["limit"] = s.limit()
        time.sleep(30)
        return gpu_check.Row("slow", True, "finished")

    monkeypatch.setitem(gpu_check.ROWS, "slow", slow)
    monkeypatch.setitem(gpu_check.ROWS, "after", lambda s, m: gpu_check.Row("after", True, "finished"))
    s = gpu_check.Settings.make("cpu", True, tmp_path)
    started = time.monotonic()
    part = gpu_check.Part(("slow", "after"), 0.5)  # an H100 budget: doubled on a CPU
    rows = gpu_check.run_part(9, part, ["slow", "after"], s, tmp_path)
    assert time.monotonic() - started < 10
    assert seen["limit"] <= 1.0
    assert [(r.name, r.ok) for r in rows] == [("slow", False), ("after", False)]
    assert all("part 9's budget of 1 s ran out" in r.numbers for r in rows)
