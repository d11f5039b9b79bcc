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


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny prepared dataset (11-token vocabulary, sequences of 8) for short training runs."""
    import numpy as np

    from sedd_scale.data.manifest import TokenizerInfo
    from sedd_scale.data.prepare import write_sequences

    out = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    write_sequences(out, {"train": rng.integers(0, 11, (256, 8)), "valid": rng.integers(0, 11, (8, 8))},
                    TokenizerInfo("tiny", 11, 10), seqs_per_sample=8, seqs_per_shard=64)
    return out


def _release_process_group() -> None:
    """Destroy megatron's groups and the default process group (what a test or a module made)."""
    import torch.distributed as dist

    from sedd_scale.distributed import parallel

    parallel.destroy_parallel()
    dist.destroy_process_group()


@pytest.fixture(autouse=True, scope="module")
def no_process_group_outlives_its_module(request):
    """A module fixture (or test) that creates the default process group must destroy it: a leaked group makes
    later modules in the same worker depend on the order pytest-xdist hands out files."""
    import torch.distributed as dist

    before = dist.is_available() and dist.is_initialized()
    yield
    if not before and dist.is_initialized():
        _release_process_group()
        pytest.fail(f"{request.node.nodeid} left torch.distributed initialized; destroy the process group it made")


@pytest.fixture(autouse=True)
def no_leaked_process_group(request):
    """The same for one test (outside `tp1` and other module-scoped fixtures, which hold theirs for the module)."""
    import torch.distributed as dist

    before = dist.is_available() and dist.is_initialized()
    yield
    if before or "tp1" in request.fixturenames or not dist.is_initialized():
        return
    _release_process_group()
    pytest.fail(f"{request.node.nodeid} left torch.distributed initialized; destroy the process group it made")


@pytest.fixture
def release_process_group():
    """For tests of APIs that keep their process group for the caller (`load_model`, `load_pretrained`): the group
    the test made is destroyed after it (one that was there before, e.g. `tp1`'s, is its owner's)."""
    import torch.distributed as dist

    before = dist.is_initialized()
    yield
    if not before and dist.is_initialized():
        _release_process_group()
