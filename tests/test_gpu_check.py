"""benchmarks/gpu_check.py works before a GPU sees it: its CPU mode runs every row on tiny shapes."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_quick_mode_passes_every_row_on_cpu(tmp_path):
    started = time.monotonic()
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--work",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})
    took = time.monotonic() - started
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = p.stdout[p.stdout.index("gpu_check on cpu (quick)"):].splitlines()[1:]
    rows = {line.split()[0]: line for line in table if line.strip()}
    assert set(rows) == {"train-fp32", "train-bf16-mixed", "resume", "convert", "step-small", "step-medium", "loss",
                         "sampler"}, table
    assert all(" PASS " in line for line in rows.values()), table
    assert took < 180, f"quick mode took {took:.0f} s (budget: 3 minutes)"
