"""ZeRO's overlap_comm and bucket keys change when gradients are reduced, not what a step computes.

The toy of tests/test_engine.py (megatron-core TP layers, AdamW with weight decay, binding clipping, two
micro-batches per rank per step) trains on two gloo ranks (DP2) under ZeRO-1, 2 and 3 with
parallel.zero_overlap_comm on and off, with buckets of 200 elements so that each backward fills several
(and, with overlap, alternates DeepSpeed's two ZeRO-1/2 buckets). Losses, gradient norms and weights must be
bitwise equal: with two ranks every reduced element is one sum a + b, which IEEE addition makes independent of
the order and the bucket a gradient lands in, and nothing else in the step depends on the schedule. Both runs
must also match the float64 one-process oracle (the same tolerances as tests/test_engine.py), so equality of
two wrong runs cannot pass.
"""
from __future__ import annotations

import pytest
import torch

from tests.test_engine import check_against_oracle, oracle

pytestmark = pytest.mark.megatron

BUCKET, PREFETCH = 200, 100  # elements; the toy has 560 parameters (matrices of 128)
CASES = [(zero, overlap) for zero in (1, 2, 3) for overlap in (True, False)]


def run_overlap_cases(cases: list[tuple[int, bool]]) -> dict:
    """Worker entry: the toy under DP2 for each (zero stage, overlap_comm), one process launch for all."""
    from sedd_scale.distributed import engine
    from tests.test_engine import run_layout

    engine.init_world(timeout_s=120)
    keys = {"zero_reduce_bucket_size": BUCKET, "zero_prefetch_bucket_size": PREFETCH}
    return {(zero, overlap): run_layout(1, 1, zero, "fp32", {**keys, "zero_overlap_comm": overlap})
            for zero, overlap in cases}


@pytest.mark.slow
def test_overlap_comm_changes_no_result():
    from tests.dist import launch

    results = launch(run_overlap_cases, 2, CASES)
    ref = oracle()
    for case in CASES:
        check_against_oracle(results, case, ref)
    for zero in (1, 2, 3):
        on, off = (zero, True), (zero, False)
        for r in results:
            # DeepSpeed read the recipe's keys (ZeRO-1/2 run their optimizer with them)
            assert r[on]["zero_read"] == {"overlap_comm": True, "reduce_bucket_size": BUCKET,
                                          "prefetch_bucket_size": PREFETCH if zero == 3 else 50_000_000}
            assert r[off]["zero_read"]["overlap_comm"] is False
            if zero < 3:
                assert (r[on]["optimizer_overlap"], r[off]["optimizer_overlap"]) == (True, False)
            assert r[on]["losses"] == r[off]["losses"] and r[on]["norms"] == r[off]["norms"], zero
            assert r[on]["shards"].keys() == r[off]["shards"].keys()
            for key, weight in r[on]["shards"].items():
                assert torch.equal(weight, r[off]["shards"][key]), (zero, key)
