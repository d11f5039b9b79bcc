"""Training/eval loaders: exact resume, DP x worker partitioning, shuffling, blending, state checks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sedd_scale.data.loader import EvalLoader, LoaderConfig, TokenLoader
from sedd_scale.data.manifest import TokenizerInfo
from sedd_scale.data.prepare import write_sequences

VOCAB = TokenizerInfo("gpt2", 50257, 50256)


def make_dataset(out: Path, n: int, seq_len: int = 8, seqs_per_shard: int = 24, first_id: int = 0,
                 valid: int = 0) -> str:
    """A dataset whose sequence k starts with token first_id + k (so streams can be checked by id)."""
    ids = first_id + np.arange(n + valid)
    seqs = (ids[:, None] * 7 + np.arange(seq_len)) % VOCAB.vocab_size
    seqs[:, 0] = ids
    splits = {"train": seqs[:n]} | ({"valid": seqs[n:]} if valid else {})
    write_sequences(out, splits, VOCAB, seqs_per_sample=5, seqs_per_shard=seqs_per_shard)
    return str(out / "manifest.json")


def ids(batches: list[torch.Tensor]) -> list[int]:
    """The sequence ids (first tokens) of batches, in stream order."""
    return [int(i) for b in batches for i in b[:, 0]]


def take(loader: TokenLoader, n: int) -> list[torch.Tensor]:
    """The next n batches of a loader, from its current state."""
    it = iter(loader)
    return [next(it) for _ in range(n)]


def resumed_stream(config: LoaderConfig, cuts: list[int], dp_rank: int = 0, dp_size: int = 1) -> list[torch.Tensor]:
    """Batches of a run killed after each cut (fresh loader + JSON round-tripped state each time)."""
    out, state = [], None
    for n in cuts:
        loader = TokenLoader(config, dp_rank, dp_size)
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))
        out += take(loader, n)
        state = loader.state_dict()
        del loader
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loader")
    return {"a": make_dataset(root / "a", 203, valid=29), "b": make_dataset(root / "b", 61, first_id=10_000)}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(data, workers):
    config = LoaderConfig([data["a"]], seq_len=8, micro_batch=4, seed=3, num_workers=workers)
    reference = take(TokenLoader(LoaderConfig([data["a"]], 8, 4, seed=3)), 130)  # 0 workers, ~2.6 epochs
    got = resumed_stream(config, [1, 17, 33, 50, 29])  # cuts mid-epoch and across epoch ends (50 batches/epoch)
    assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))
    assert all(b.dtype == torch.int64 and b.shape == (4, 8) for b in got)


def test_reiterating_continues_and_micro_batch_may_change(data):
    config = LoaderConfig([data["a"]], seq_len=8, micro_batch=4, seed=1)
    reference = ids(take(TokenLoader(config), 40))
    loader = TokenLoader(config)
    first = ids(take(loader, 9)) + ids(take(loader, 11))  # a new iterator continues after the old one
    state = loader.state_dict()
    other = TokenLoader(LoaderConfig([data["a"]], seq_len=8, micro_batch=5, seed=1, num_workers=2))
    other.load_state_dict(state)
    assert first + ids(take(other, 16)) == reference


def test_epochs_cover_everything_shuffled_and_seeded(data):
    loader = TokenLoader(LoaderConfig([data["a"]], seq_len=8, micro_batch=7, seed=5))
    stream = ids(take(loader, 3 * 203 // 7 + 1))
    epochs = [stream[e * 203:(e + 1) * 203] for e in range(3)]
    assert all(sorted(e) == list(range(203)) for e in epochs)  # dp=1: no remainder at all
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != sorted(epochs[0])
    assert stream == ids(take(TokenLoader(LoaderConfig([data["a"]], 8, 7, seed=5)), len(stream) // 7 + 1))[:len(stream)]
    assert stream[:203] != ids(take(TokenLoader(LoaderConfig([data["a"]], 8, 7, seed=6)), 30))[:203]
    assert loader.epochs[0] == pytest.approx(len(stream) / 203)


@pytest.mark.parametrize("dp_size", [2, 3])
def test_dp_partition_covers_an_epoch_once(data, dp_size):
    loaders = [TokenLoader(LoaderConfig([data["a"]], seq_len=8, micro_batch=4, seed=2), r, dp_size)
               for r in range(dp_size)]
    per_rank = 203 // dp_size
    assert all(l.sequences_per_epoch == [per_rank] for l in loaders)
    streams = [ids(take(l, per_rank // 4 + 1)) for l in loaders]  # equal batch counts by construction
    epoch = [s[:per_rank] for s in streams]
    seen = [i for e in epoch for i in e]
    assert len(seen) == len(set(seen)) == dp_size * per_rank  # disjoint
    assert 203 - len(seen) == 203 % dp_size < dp_size  # the documented remainder
    # the next epoch is a new shuffle and its remainder is (typically) different sequences
    nxt = {i for s in streams for i in s[per_rank:]}
    assert nxt and nxt <= set(range(203))


def test_blending_is_deterministic_and_weighted(data):
    config = LoaderConfig([data["a"], data["b"]], seq_len=8, micro_batch=4, weights=[3.0, 1.0], seed=4)
    stream = ids(take(TokenLoader(config), 100))
    from_b = [i >= 10_000 for i in stream]
    for i in range(1, len(stream) + 1):  # largest-deficit rule: counts never stray a sequence from the weights
        assert abs(sum(from_b[:i]) - 0.25 * i) < 1.0
    # each source's subsequence is exactly that source's own (unblended) stream
    a_alone = ids(take(TokenLoader(LoaderConfig([data["a"]], 8, 1, seed=4)), 300))
    assert [i for i in stream if i < 10_000] == a_alone[:300]
    b_sub = [i for i in stream if i >= 10_000]
    assert sorted(b_sub[:61]) == list(range(10_000, 10_061))  # 100 sequences of b: a full epoch, then more
    assert ids(resumed_stream(LoaderConfig([data["a"], data["b"]], 8, 4, weights=[3.0, 1.0], seed=4,
                                           num_workers=2), [13, 41, 46])) == stream
    default = TokenLoader(LoaderConfig([data["a"], data["b"]], 8, 4))
    assert default.weights.tolist() == pytest.approx([203 / 264, 61 / 264])  # default: by size


def test_state_refuses_a_different_stream(data, tmp_path):
    config = LoaderConfig([data["a"]], seq_len=8, micro_batch=4, seed=0)
    loader = TokenLoader(config, 0, 2)
    take(loader, 3)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="dp_size=2 but this run has dp_size=4"):
        TokenLoader(config, 0, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_rank 0 given to dp_rank 1"):
        TokenLoader(config, 1, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(LoaderConfig([data["a"]], 8, 4, seed=1), 0, 2).load_state_dict(state)
    changed = make_dataset(tmp_path / "a2", 203, first_id=1)  # same shape, different content
    with pytest.raises(ValueError, match="manifest's content changed"):
        TokenLoader(LoaderConfig([changed], 8, 4, seed=0), 0, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="blends 1 manifests, this loader 2"):
        TokenLoader(LoaderConfig([data["a"], data["b"]], 8, 4, seed=0), 0, 2).load_state_dict(state)


def test_loader_iterator_goes_stale_after_load(data):
    loader = TokenLoader(LoaderConfig([data["a"]], seq_len=8, micro_batch=4))
    it = iter(loader)
    next(it)
    loader.load_state_dict(TokenLoader(LoaderConfig([data["a"]], 8, 4)).state_dict())
    with pytest.raises(RuntimeError, match="stale"):
        next(it)


@pytest.mark.parametrize("dp_size,micro_batch", [(1, 8), (2, 4), (3, 5)])
def test_eval_loader_covers_split_once_in_order(data, dp_size, micro_batch):
    loaders = [EvalLoader(data["a"], "valid", micro_batch, r, dp_size) for r in range(dp_size)]
    assert len({len(l) for l in loaders}) == 1
    per_rank = [[(b.tokens, b.valid) for b in l] for l in loaders]
    assert all(len(p) == len(loaders[0]) for p in per_rank)
    seen = []
    for g in range(len(loaders[0])):
        for r in range(dp_size):
            tokens, valid = per_rank[r][g]
            assert tokens.shape == (micro_batch, 8) and tokens.dtype == torch.int64
            assert (tokens[~valid] == VOCAB.eos_id).all()
            seen += tokens[valid, 0].tolist()
    assert seen == list(range(203, 232))  # every valid sequence once, in order


# ------------------------------------------------------------------------------------------------
# Two real data-parallel processes (gloo), each with 2 DataLoader workers.
def _dp_ranks(manifest: str) -> dict:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    config = LoaderConfig([manifest], seq_len=8, micro_batch=4, seed=9, num_workers=2)
    reference = ids(take(TokenLoader(LoaderConfig([manifest], 8, 4, seed=9), rank, world), 60))  # uninterrupted
    cuts = [[5, 31, 24], [19, 41]][rank]  # each rank is interrupted at its own steps
    resumed = ids(resumed_stream(config, cuts, rank, world))
    everyone = [None] * world
    dist.all_gather_object(everyone, reference)
    return {"reference": reference, "resumed": resumed, "all": everyone}


@pytest.mark.slow
def test_two_dp_processes_resume_and_partition(data):
    from tests.dist import launch

    results = launch(_dp_ranks, 2, data["a"])
    for r in results:
        assert r["resumed"] == r["reference"]
    per_rank = 203 // 2
    epoch0 = [results[0]["all"][r][:per_rank] for r in range(2)]
    assert epoch0[0] == results[0]["reference"][:per_rank] and epoch0[1] == results[1]["reference"][:per_rank]
    assert not set(epoch0[0]) & set(epoch0[1]) and len(set(epoch0[0]) | set(epoch0[1])) == 202
    single = [TokenLoader(LoaderConfig([data["a"]], 8, 4, seed=9), r, 2) for r in range(2)]
    assert [ids(take(l, 60)) for l in single] == [r["reference"] for r in results]  # same as in one process
