"""Fixtures shared by test modules."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tp1():
    """megatron's groups for this process (TP = PP = DP = 1), torn down afterwards."""
    import torch.distributed as dist

    from sedd_scale.distributed import parallel

    created = not dist.is_initialized()
    parallel.init_model_parallel(1)
    yield
    if created:
        parallel.destroy_parallel()
        dist.destroy_process_group()


@pytest.fixture
def one_thread():
    """Many tiny ops: one intra-op thread avoids oversubscribing a busy machine (20x slower under load otherwise)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
