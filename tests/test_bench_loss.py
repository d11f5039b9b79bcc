"""benchmarks/bench_loss.py's memory bound: a fused row peaking past naive / --min-ratio (or --max-mib) fails the run
with a message naming it; rows within the bound pass. The check is pure arithmetic on the measured rows (no timing)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_loss

    return bench_loss


def test_bound_is_the_naive_peak_over_the_ratio_and_the_absolute_cap(bench):
    assert bench.peak_bound(6396 * MIB, 10.0, None) == pytest.approx(639.6 * MIB)
    assert bench.peak_bound(6396 * MIB, 10.0, 500) == 500 * MIB
    assert bench.peak_bound(None, 10.0, 500) == 500 * MIB
    assert bench.peak_bound(None, 10.0, None) == float("inf")


def test_rows_past_the_bound_are_named(bench):
    rows = [("naive", 1, {"peak": 6396 * MIB}), ("fused per-token", 1, {"peak": 1150 * MIB}),
            ("fused weighted", 1, {"peak": 600 * MIB}), ("fused weighted", 2, {"peak": 219 * MIB})]
    assert bench.peak_problems("uniform", rows, 639.6 * MIB) == [
        "uniform: fused per-token TP1 peaked at 1150 MiB per rank, over the bound of 640 MiB"]
    assert bench.peak_problems("uniform", rows[:1] + rows[2:], 639.6 * MIB) == []


@pytest.mark.parametrize("fused_mib,fails", [(1150, True), (269, False)])
def test_main_exits_nonzero_on_a_regression(bench, monkeypatch, capsys, fused_mib, fails):
    """main's wiring: the measured rows (here given, as a regressed and a healthy run would measure them) against the
    default 10x bound; a regression ends the run with exit status 1 and the message, after the table."""
    measured = {"naive": 6396 * MIB, "fused per-token": fused_mib * MIB, "fused weighted": 235 * MIB}
    monkeypatch.setattr(bench, "run_row", lambda kind, tp, args: {"peak": measured[kind], "time": 1.0})
    monkeypatch.setattr(sys, "argv", ["bench_loss.py", "--graph", "uniform"])
    if fails:
        with pytest.raises(SystemExit) as exit_:
            bench.main()
        assert isinstance(exit_.value.code, str)  # sys.exit(message): status 1, the message on stderr
        assert "uniform: fused per-token TP1 peaked at 1150 MiB per rank, over the bound of 640 MiB" in exit_.value.code
    else:
        bench.main()
    table = capsys.readouterr().out
    assert "| fused per-token | 1 | %d | " % fused_mib in table and "| 640 |" in table
