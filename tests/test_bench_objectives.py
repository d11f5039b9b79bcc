"""benchmarks/bench_objectives.py: score entropy and masked cross-entropy trained side by side (its own module: the
trainer it runs makes and ends megatron's groups, which must not meet a module fixture's)."""
from __future__ import annotations

import math

import pytest


@pytest.mark.slow
@pytest.mark.megatron
def test_trained_masked_ce_and_score_entropy_models_bound_the_true_nll_alike(release_process_group, capsys):
    """benchmarks/bench_objectives.py as documented (300 steps each on a Markov chain of known entropy, fixed
    seeds): both objectives' validation ELBOs bound the true NLL and agree within three combined standard errors."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))  # it imports bench_step's meter
    try:
        spec = importlib.util.spec_from_file_location("bench_objectives", bench / "bench_objectives.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        rows = {r["objective"]: r for r in module.main(["--samples", "0"])}
    finally:
        sys.path.remove(str(bench))
    truth = module.true_nll_per_token(32, 32)
    se, ce = rows["score_entropy"], rows["masked_ce"]
    for r in (se, ce):  # a bound, and a trained one (an untrained model is near log 32 = 3.47 nats)
        assert truth - 3 * r["stderr"] < r["elbo"] < truth + 0.5, (r, truth)
    assert abs(se["elbo"] - ce["elbo"]) < 3 * math.hypot(se["stderr"], ce["stderr"]), (se, ce)
    assert "masked_ce" in capsys.readouterr().out
