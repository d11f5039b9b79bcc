"""Training/eval loaders: one global stream whatever the DP layout, exact resume (also resharded), the global
block shuffle, blending, workers, reads of exactly a rank's rows, rank 0's shared check, state checks."""
from __future__ import annotations

import json
import math
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sedd_scale.data.checked import CheckedSplit, check_split
from sedd_scale.data.loader import EvalLoader, LoaderConfig, TokenLoader, check_sources
from sedd_scale.data.manifest import Manifest, ManifestError, ShardInfo, SplitInfo, TokenizerInfo
from sedd_scale.data.prepare import write_sequences
from sedd_scale.data.tar_layout import ShardLayout
from sedd_scale.layout import row_offset as global_row_offset

VOCAB = TokenizerInfo("gpt2", 50257, 50256)


def make_dataset(out: Path, n: int, seq_len: int = 8, seqs_per_shard: int = 24, first_id: int = 0,
                 valid: int = 0, seqs_per_sample: int = 5) -> str:
    """A dataset whose sequence k starts with token first_id + k (so streams can be checked by id)."""
    ids = first_id + np.arange(n + valid)
    seqs = (ids[:, None] * 7 + np.arange(seq_len)) % VOCAB.vocab_size
    seqs[:, 0] = ids
    splits = {"train": seqs[:n]} | ({"valid": seqs[n:]} if valid else {})
    write_sequences(out, splits, VOCAB, seqs_per_sample=seqs_per_sample, seqs_per_shard=seqs_per_shard)
    return str(out / "manifest.json")


def ids(batches: list[torch.Tensor]) -> list[int]:
    """The sequence ids (first tokens) of batches, in stream order."""
    return [int(i) for b in batches for i in b[:, 0]]


def take(loader: TokenLoader, n: int) -> list[torch.Tensor]:
    """The next n batches of a loader, from its current state."""
    it = iter(loader)
    return [next(it) for _ in range(n)]


def resumed_stream(config: LoaderConfig, cuts: list[int], dp_rank: int = 0, dp_size: int = 1) -> list[torch.Tensor]:
    """Micro-batches of a run killed after each cut (fresh loader + JSON round-tripped state each time)."""
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


def assemble(per_rank: list[list[torch.Tensor]], micro_batch: int, global_batch: int) -> list[torch.Tensor]:
    """Global batches from each rank's micro-batches, every row at its global index (the trainer's convention)."""
    dp = len(per_rank)
    accum = global_batch // (micro_batch * dp)
    steps = len(per_rank[0]) // accum
    assert all(len(p) == steps * accum for p in per_rank)
    out = []
    for j in range(steps):
        batch = torch.full((global_batch, per_rank[0][0].shape[1]), -1, dtype=torch.int64)
        for m in range(accum):
            for r in range(dp):
                o = global_row_offset(m, r, micro_batch, dp)
                assert (batch[o:o + micro_batch] == -1).all()  # no row is handed out twice
                batch[o:o + micro_batch] = per_rank[r][j * accum + m]
        assert (batch >= 0).all()  # every row of the step is handed out
        out.append(batch)
    return out


def layout_batches(manifests: list[str], dp: int, micro_batch: int, global_batch: int, steps: int, *,
                   seed: int = 0, workers: int = 0, state: dict | None = None) -> list[torch.Tensor]:
    """`steps` global batches as `dp` ranks of `micro_batch` rows see them (each rank from `state` if given)."""
    accum = global_batch // (micro_batch * dp)
    config = LoaderConfig(manifests, 8, micro_batch, seed=seed, num_workers=workers, global_batch=global_batch)
    per_rank = []
    for r in range(dp):
        loader = TokenLoader(config, r, dp)
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))
        per_rank.append(take(loader, steps * accum))
    return assemble(per_rank, micro_batch, global_batch)


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bitwise equal lists of batches."""
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(data, workers):
    # global batch 8 = 2 micro-batches of 4: odd cuts leave mid-step states, resumed under the same layout
    config = LoaderConfig([data["a"]], seq_len=8, micro_batch=4, seed=3, num_workers=workers, global_batch=8)
    reference = take(TokenLoader(LoaderConfig([data["a"]], 8, 4, seed=3, global_batch=8)), 130)  # ~2.6 epochs
    got = resumed_stream(config, [1, 17, 33, 50, 29])  # cuts mid-epoch and across epoch ends (50 batches/epoch)
    assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))
    assert all(b.dtype == torch.int64 and b.shape == (4, 8) for b in got)


def test_reiterating_continues_and_micro_batch_may_change(data):
    config = LoaderConfig([data["a"]], seq_len=8, micro_batch=4, seed=1, global_batch=20)
    reference = ids(take(TokenLoader(config), 40))
    loader = TokenLoader(config)
    first = ids(take(loader, 9)) + ids(take(loader, 11))  # a new iterator continues after the old one (mid-step)
    state = loader.state_dict()
    assert (state["steps"], state["micro"]) == (4, 0)
    other = TokenLoader(LoaderConfig([data["a"]], seq_len=8, micro_batch=5, seed=1, num_workers=2, global_batch=20))
    other.load_state_dict(state)
    assert first + ids(take(other, 16)) == reference


# The layouts of one global batch of 8: (dp, micro_batch), grad_accum = 8 / (dp * micro_batch).
LAYOUTS = [(1, 8), (1, 2), (2, 2), (4, 2), (2, 4), (4, 1)]


def test_global_batches_do_not_depend_on_the_layout(data):
    manifests = [data["a"], data["b"]]
    steps = 40  # 320 sequences: past the end of an epoch of a (203) and of b (61)
    reference = layout_batches(manifests, 1, 8, 8, steps, seed=7)
    stream = ids(take(TokenLoader(LoaderConfig(manifests, 8, 1, seed=7, global_batch=1)), 8 * steps))
    assert ids(reference) == stream  # step j holds global sequences [8j, 8j+8): the stream is G-independent too
    assert sum(i >= 10_000 for i in stream) > 61 and sum(i < 10_000 for i in stream) > 203
    for dp, mb in LAYOUTS[1:]:
        assert same(layout_batches(manifests, dp, mb, 8, steps, seed=7), reference), (dp, mb)
    assert same(layout_batches(manifests, 2, 2, 8, steps, seed=7, workers=2), reference)
    assert not same(layout_batches(manifests, 2, 2, 8, steps, seed=8), reference)  # the comparison can fail


def test_resume_across_layouts(data):
    manifests, k, n = [data["a"], data["b"]], 13, 27  # 40 steps in all: across both sources' epoch ends
    reference = layout_batches(manifests, 1, 8, 8, k + n, seed=5)
    config = LoaderConfig(manifests, 8, 2, seed=5, global_batch=8)
    ranks = [TokenLoader(config, r, 2) for r in range(2)]
    assert same(assemble([take(l, 2 * k) for l in ranks], 2, 8), reference[:k])
    state = ranks[0].state_dict()
    assert state["steps"] == k and state["micro"] == 0 and state["layout"] is None
    assert ranks[1].state_dict() == state  # the same on every rank ...
    for dp, mb in [(1, 8), (4, 1)]:  # ... and under every layout of the global batch
        others = [TokenLoader(LoaderConfig(manifests, 8, mb, seed=5, global_batch=8), r, dp) for r in range(dp)]
        for l in others:
            take(l, k * 8 // (dp * mb))
        assert all(l.state_dict() == state for l in others)
    for dp, mb, workers in [(1, 8, 0), (4, 2, 0), (4, 1, 2), (2, 2, 2), (1, 2, 2)]:
        assert same(layout_batches(manifests, dp, mb, 8, n, seed=5, workers=workers, state=state),
                    reference[k:]), (dp, mb, workers)
    # A mid-step state resumes under its own layout only.
    take(ranks[0], 1)
    mid = ranks[0].state_dict()
    assert (mid["steps"], mid["micro"], mid["layout"]) == (k, 1, {"dp_size": 2, "micro_batch": 2})
    for dp, mb in [(4, 2), (1, 4), (2, 1)]:
        with pytest.raises(ValueError, match=r"middle of an optimizer step .* dp_size=2, micro_batch=2; this loader "
                                             rf"has dp_size={dp}, micro_batch={mb}"):
            TokenLoader(LoaderConfig(manifests, 8, mb, seed=5, global_batch=8), 0, dp).load_state_dict(mid)
    resumed = TokenLoader(config, 0, 2)
    resumed.load_state_dict(json.loads(json.dumps(mid)))
    rest = take(resumed, 1)[0]  # rank 0's second micro-batch of step k: global rows [4, 6)
    assert torch.equal(rest, reference[k][global_row_offset(1, 0, 2, 2):][:2])


def dp_stream(manifest: str, dp_size: int, micro_batch: int, steps: int, seed: int) -> list[int]:
    """Sequence ids of the first `steps` global batches (no accumulation) assembled from `dp_size` ranks."""
    config = LoaderConfig([manifest], 8, micro_batch, seed=seed)
    return ids(assemble([take(TokenLoader(config, r, dp_size), steps) for r in range(dp_size)], micro_batch,
                        micro_batch * dp_size))


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_epochs_cover_everything_shuffled_and_seeded(data, dp_size):
    mb = 7
    steps = -(-3 * 203 // (mb * dp_size))  # at least 3 epochs of 203 sequences
    loaders = [TokenLoader(LoaderConfig([data["a"]], 8, mb, seed=5), r, dp_size) for r in range(dp_size)]
    assert all(l.sequences_per_epoch == [203] for l in loaders)  # every sequence, on every rank
    stream = ids(assemble([take(l, steps) for l in loaders], mb, mb * dp_size))
    epochs = [stream[e * 203:(e + 1) * 203] for e in range(3)]
    assert all(sorted(e) == list(range(203)) for e in epochs)  # each epoch once, no remainder dropped
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != sorted(epochs[0])  # reshuffled every epoch
    assert stream == dp_stream(data["a"], dp_size, mb, steps, seed=5)  # seeded
    assert stream[:203] != dp_stream(data["a"], dp_size, mb, steps, seed=6)[:203]
    assert all(l.epochs[0] == pytest.approx(len(stream) / 203) for l in loaders)
    if dp_size > 1:  # the ranks get different rows of each global batch
        mine = [set(ids(take(TokenLoader(LoaderConfig([data["a"]], 8, mb, seed=5), r, dp_size), 5)))
                for r in range(dp_size)]
        assert all(len(m) == 5 * mb for m in mine) and not set.intersection(*mine)
        assert len(set.union(*mine)) == 5 * mb * dp_size


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
    two = [TokenLoader(LoaderConfig([data["a"], data["b"]], 8, 2, weights=[3.0, 1.0], seed=4, global_batch=4), r, 2)
           for r in range(2)]
    assert ids(assemble([take(l, 100) for l in two], 2, 4)) == stream  # blended per global row, not per rank
    default = TokenLoader(LoaderConfig([data["a"], data["b"]], 8, 4))
    assert default.weights.tolist() == pytest.approx([203 / 264, 61 / 264])  # default: by size


def test_global_batch_must_split_evenly(data):
    with pytest.raises(ValueError, match="global_batch must be a positive multiple of micro_batch=4, got 10"):
        LoaderConfig([data["a"]], 8, 4, global_batch=10)
    with pytest.raises(ValueError, match=r"global_batch=12 is not a multiple of micro_batch x dp_size = 4 x 2 = 8"):
        TokenLoader(LoaderConfig([data["a"]], 8, 4, global_batch=12), 0, 2)
    loader = TokenLoader(LoaderConfig([data["a"]], 8, 4, global_batch=24), 1, 3)
    assert (loader.global_batch, loader.grad_accum) == (24, 2)
    assert TokenLoader(LoaderConfig([data["a"]], 8, 4), 0, 3).global_batch == 12  # default: no accumulation


def test_state_refuses_a_different_stream(data, tmp_path):
    config = LoaderConfig([data["a"]], seq_len=8, micro_batch=4, seed=0, global_batch=8)
    loader = TokenLoader(config, 0, 2)
    take(loader, 3)
    state = loader.state_dict()
    TokenLoader(LoaderConfig([data["a"]], 8, 2, seed=0, global_batch=8), 3, 4).load_state_dict(state)  # fine
    with pytest.raises(ValueError, match="global batch of 8 sequences per optimizer step, this run has 16"):
        TokenLoader(LoaderConfig([data["a"]], 8, 4, seed=0, global_batch=16), 0, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(LoaderConfig([data["a"]], 8, 4, seed=1, global_batch=8), 0, 2).load_state_dict(state)
    changed = make_dataset(tmp_path / "a2", 203, first_id=1)  # same shape, different content
    with pytest.raises(ManifestError, match="the dataset changed since the checkpoint was saved"):
        TokenLoader(LoaderConfig([changed], 8, 4, seed=0, global_batch=8), 0, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="blends 1 manifests, this loader 2"):
        TokenLoader(LoaderConfig([data["a"], data["b"]], 8, 4, seed=0, global_batch=8), 0, 2).load_state_dict(state)
    old = {"format": "sedd-scale-loader", "version": 1, "dp_size": 2, "dp_rank": 0, "step": 3, "consumed": [12]}
    with pytest.raises(ValueError, match="version 1, this loader reads version 3 .*start the data stream afresh"):
        TokenLoader(config, 0, 2).load_state_dict(old)
    previous = {**state, "version": 2}  # the shard-shuffling loader's state: same fields, another stream
    with pytest.raises(ValueError, match=r"state is version 2, this loader reads version 3 \(one global shuffle"):
        TokenLoader(config, 0, 2).load_state_dict(previous)


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


def test_a_global_batch_draws_blocks_from_across_the_corpus(tmp_path):
    # An ordered corpus (sequence k is the k-th of the input) of 64 shards: the previous loader's global batch
    # was a stretch of one or two shards. Now it is G / B blocks of B consecutive sequences from everywhere.
    n, per_shard, b = 64 * 40, 40, 4
    manifest = str(tmp_path / "ordered" / "manifest.json")
    make_dataset(tmp_path / "ordered", n, seqs_per_shard=per_shard, seqs_per_sample=b)
    loader = TokenLoader(LoaderConfig([manifest], 8, 8, seed=2, global_batch=64))
    it = iter(loader)
    epoch, distinct = [], []
    for step in range(n // 64):
        planned = loader.step_sequences()
        batch = torch.cat([next(it) for _ in range(8)])
        got = batch[:, 0].numpy()
        assert (planned[:, 0] == 0).all() and (planned[:, 1] == got).all()  # step_sequences is the batch
        blocks = got.reshape(-1, b)
        assert (blocks[:, 0] % b == 0).all() and (np.diff(blocks, axis=1) == 1).all()  # whole blocks, in order
        distinct.append(len(np.unique(got // per_shard)))
        assert distinct[-1] >= 8  # the previous loader: 1 or 2
        assert got.max() - got.min() > n // 3  # spread over the corpus (16 uniform draws: P(fail) ~ 1e-6)
        epoch += got.tolist()
    assert sorted(epoch) == list(range(n))  # and still every sequence exactly once per epoch
    # 16 of the 640 blocks drawn uniformly without replacement, 10 per shard: the expected number of shards hit
    blocks_per_shard, drawn, total = per_shard // b, 64 // b, n // b
    expected = 64 * (1 - math.comb(total - blocks_per_shard, drawn) / math.comb(total, drawn))
    assert abs(np.mean(distinct) - expected) < 1.0, (np.mean(distinct), expected)  # ~5 standard errors


def _huge_source(tmp_path, n: int) -> CheckedSplit:
    """A 'checked' split of n sequences in 10^4 shards that do not exist (what rank 0 would hand over)."""
    layout, shards, per = ShardLayout(8, 2, 8), [], n // 10_000
    for i in range(10_000):
        shards.append(ShardInfo(f"train-{i:06d}.tar", per, layout.shard_bytes(per), "0" * 64, f"train-{i:06d}.crc32",
                                "0" * 64))
    m = Manifest(VOCAB, 8, "uint16", 8, {"train": SplitInfo(n, n, 8 * n, 0, shards)},
                 location=str(tmp_path / "huge" / "manifest.json"))
    return CheckedSplit(m, "train", tuple(m.shard_refs("train")), (), m.fingerprint())


def test_a_ten_billion_sequence_source_starts_instantly(tmp_path):
    n = 10**10
    checked = _huge_source(tmp_path, n)
    config = LoaderConfig([checked.manifest.location], 8, 8, seed=1, global_batch=512)
    started = time.perf_counter()
    loader = TokenLoader(config, 3, 8, checked=[checked])
    state = loader.state_dict()
    state["steps"] = 3 * n // 512 + 12_345  # deep into the fourth epoch
    state["consumed"] = [state["steps"] * 512]
    loader.load_state_dict(state)
    rows = loader.step_sequences()[:, 1]
    assert time.perf_counter() - started < 2.0  # no O(N) permutation: an O(N) one would not finish at all
    assert len(np.unique(rows)) == 512 and rows.min() >= 0 and rows.max() < n
    assert (rows.reshape(-1, 8) % 8 == np.arange(8)).all()  # blocks of 8 (one tar sample each)


def _pread_log(monkeypatch) -> list[tuple[str, int, int]]:
    """Record every os.pread as (file, offset, size)."""
    log, real = [], os.pread

    def pread(fd, size, offset):
        log.append((os.readlink(f"/proc/self/fd/{fd}"), offset, size))
        return real(fd, size, offset)

    monkeypatch.setattr(os, "pread", pread)
    return log


@pytest.mark.parametrize("dp_size,micro_batch", [(4, 2), (2, 5), (1, 3)])
def test_a_rank_reads_exactly_the_bytes_of_its_rows(data, monkeypatch, dp_size, micro_batch):
    manifest = Manifest.load(data["a"])
    layout, refs = manifest.layout, manifest.shard_refs("train")
    starts = np.cumsum([0] + [r.info.num_sequences for r in refs])
    config = LoaderConfig([data["a"]], 8, micro_batch, seed=4, global_batch=2 * micro_batch * dp_size)
    rank = dp_size - 1
    loader = TokenLoader(config, rank, dp_size)
    log = _pread_log(monkeypatch)
    expected = []
    it = iter(loader)
    for _ in range(12):  # 6 steps of 2 micro-batches: fewer rows than an epoch, so none repeats
        if loader.micro == 0:
            planned = loader.step_sequences()[:, 1]
        o = global_row_offset(loader.micro, rank, micro_batch, dp_size)
        assert next(it)[:, 0].tolist() == planned[o:o + micro_batch].tolist()
        expected += planned[o:o + micro_batch].tolist()
    monkeypatch.undo()
    tar_of = {os.path.realpath(r.tar): i for i, r in enumerate(refs)}
    crc_of = {os.path.realpath(r.crc): i for i, r in enumerate(refs)}
    read_rows, crc_rows = [], []
    for path, offset, size in log:
        if path in crc_of:
            assert offset % 4 == 0 and size % 4 == 0
            crc_rows += (starts[crc_of[path]] + offset // 4 + np.arange(size // 4)).tolist()
            continue
        shard = tar_of[path]
        begin = layout.row_offsets(np.arange(refs[shard].info.num_sequences))
        inside = (begin >= offset) & (begin + layout.row_bytes <= offset + size)
        assert offset in begin and offset + size - layout.row_bytes in begin  # starts and ends on a row's bounds
        assert (size - inside.sum() * layout.row_bytes) % 512 == 0  # the rest: whole tar headers between samples
        read_rows += (starts[shard] + np.flatnonzero(inside)).tolist()
    assert sorted(read_rows) == sorted(expected)  # the rank's rows, each once, and no other row
    assert sorted(crc_rows) == sorted(expected)  # and exactly their CRC32s


def test_rank0_check_is_shared_without_touching_the_filesystem(data, monkeypatch):
    config = LoaderConfig([data["a"], data["b"]], 8, 2, seed=6, global_batch=8)
    checked = pickle.loads(pickle.dumps(check_sources(config)))  # what broadcast_object_list carries
    valid = pickle.loads(pickle.dumps(check_split(data["a"], "valid")))
    reference = take(TokenLoader(config, 1, 2), 20)
    evaluation = [b.tokens for b in EvalLoader(data["a"], "valid", 3, 1, 2)]

    def no_metadata(*args, **kwargs):
        raise AssertionError("a rank given rank 0's check must not stat or open anything at start")

    monkeypatch.setattr(os, "stat", no_metadata)
    monkeypatch.setattr(Manifest, "load", no_metadata)
    loader = TokenLoader(config, 1, 2, checked=checked)
    ev = EvalLoader(data["a"], "valid", 3, 1, 2, checked=valid)
    monkeypatch.undo()
    assert same(take(loader, 20), reference)
    assert same([b.tokens for b in ev], evaluation)
    with pytest.raises(ValueError, match="are not this config's manifests"):
        TokenLoader(LoaderConfig([data["b"]], 8, 2), 0, 1, checked=checked)
    with pytest.raises(ValueError, match="checked split 'valid' .* is not split 'test'"):
        EvalLoader(data["a"], "test", 3, checked=valid)


# ------------------------------------------------------------------------------------------------
# Two real data-parallel processes (gloo), each with 2 DataLoader workers.
def _dp_ranks(manifest: str) -> dict:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    # global batch 8 = 2 ranks x 2 micro-batches x 2 accumulation steps
    config = LoaderConfig([manifest], seq_len=8, micro_batch=2, seed=9, num_workers=2, global_batch=8)
    uninterrupted = TokenLoader(LoaderConfig([manifest], 8, 2, seed=9, global_batch=8), rank, world)
    reference = take(uninterrupted, 60)
    cuts = [[5, 31, 24], [19, 41]][rank]  # each rank is interrupted at its own (also mid-step) points
    resumed = resumed_stream(config, cuts, rank, world)
    states = [None] * world
    dist.all_gather_object(states, uninterrupted.state_dict())  # after 30 steps: at a step boundary
    everyone = [None] * world
    dist.all_gather_object(everyone, reference)
    return {"reference": reference, "resumed": resumed, "all": everyone, "states": states}


@pytest.mark.slow
def test_two_dp_processes_resume_and_partition(data):
    from tests.dist import launch

    results = launch(_dp_ranks, 2, data["a"])
    for r in results:
        assert same(r["resumed"], r["reference"])
        assert same(r["all"][0], results[0]["reference"]) and same(r["all"][1], results[1]["reference"])
    batches = assemble([r["reference"] for r in results], 2, 8)  # 30 global batches, 240 sequences
    single = TokenLoader(LoaderConfig([data["a"]], 8, 8, seed=9))
    assert same(batches, take(single, 30))  # the same global batches as one rank of 8 rows
    assert sorted(ids(batches)[:203]) == list(range(203))  # the two ranks cover the epoch exactly once
    states = results[0]["states"]
    assert states[0] == states[1] == single.state_dict() and states[0]["steps"] == 30
