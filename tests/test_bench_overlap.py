"""benchmarks/bench_overlap.py runs as documented, in its smallest configuration (timings not checked)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.megatron
def test_bench_overlap_prints_both_stages_with_equal_losses(capsys):
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)  # the ranks import its worker by module name
    try:
        rows = importlib.import_module("bench_overlap").main(["--rounds", "1", "--warmup", "0", "--seq-len", "32",
                                                               "--micro", "2", "--bucket", "5000"])
    finally:
        sys.path.remove(bench)
    body = [r.split("|") for r in rows[2:]]
    assert [int(r[0]) for r in body] == [1, 2]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and r[4].strip() == "yes" for r in body), rows
    assert "overlap off s" in capsys.readouterr().out
