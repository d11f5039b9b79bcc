"""A split as every rank reads it, checked once: its usable shards, located, their sizes as the manifest says.

Loading a manifest and stat-ing every shard is per-shard metadata work: 61K shards and as many
sidecars for a 1T-token corpus. Rank 0 does it (`check_split`, on threads so a network
filesystem's latency overlaps), the trainer broadcasts the picklable result, and every other rank
builds its loaders from it without touching the filesystem (`TokenLoader(..., checked=...)`,
`EvalLoader(..., checked=...)`): startup is O(1) per rank. Sizes are the cheap check made here;
content is checked by the CRC32 of each row read, and by sha256 in `prepare_data --verify`. Shards
given as URLs are checked (size and sha256) when they land in the cache, not here.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from sedd_scale.data.indexed import IndexedRef, indexed_problem
from sedd_scale.data.manifest import Manifest, ShardRef
from sedd_scale.data.shards import ShardError, file_problem
from sedd_scale.data.urlcache import is_url

_FIX = "restore it or prepare the data again (or set data.skip_corrupt: true to train without it)"
# A resume refuses another data stream: turning skip_corrupt on or preparing the data again would be refused too.
_FIX_RESUMING = ("restore it: this run resumes from a checkpoint, and leaving the shard out (data.skip_corrupt) or "
                 "preparing the data again changes the data stream, which a resume refuses; or start a new "
                 "checkpoint.dir with data.skip_corrupt: true to train without it")
_FIX_EVALUATION = ("restore it or prepare the data again (an evaluation split is read whole: data.skip_corrupt does "
                   "not apply to it)")
# The run's validation data may be its training data: only restoring it, or other validation data, resumes.
_FIX_EVALUATION_RESUMING = ("restore it, or point data.valid at another prepared dataset (an evaluation split is read "
                            "whole: data.skip_corrupt does not apply to it)")


def advice(*, resuming: bool = False, evaluation: bool = False) -> str:
    """What to do about a missing or wrong-size shard, for a split read for training or evaluation, fresh or resumed."""
    if evaluation:
        return _FIX_EVALUATION_RESUMING if resuming else _FIX_EVALUATION
    return _FIX_RESUMING if resuming else _FIX


@dataclass(frozen=True)
class CheckedSplit:
    """A manifest split whose shards have been checked: what a rank needs to read it."""

    manifest: Manifest
    split: str
    shards: tuple[ShardRef, ...]  # the usable shards, in manifest order
    skipped: tuple[tuple[str, str], ...]  # (location, reason) of each shard left out (skip_corrupt)
    fingerprint: str  # the manifest's, computed once here (it hashes every shard entry)
    indexed: IndexedRef | None = None  # set: the split is a Megatron indexed dataset (no shards)

    @property
    def num_sequences(self) -> int:
        """Sequences in the usable shards (or the indexed dataset's split)."""
        if self.indexed is not None:
            return self.indexed.num_sequences
        return sum(r.info.num_sequences for r in self.shards)




def shard_problem(ref: ShardRef, fix: str = _FIX) -> str | None:
    """Why a local shard cannot be read (missing, or its tar or sidecar has the wrong size), or None; `fix` is the
    advice appended (`advice(...)`)."""
    if is_url(ref.tar):
        return None  # checked when it lands in the cache
    return (file_problem(ref.tar, ref.info.num_bytes, "shard", fix)
            or file_problem(ref.crc, ref.info.crc_bytes, "CRC sidecar", fix))


def check_split(manifest: Manifest | str, split: str, skip_corrupt: bool = False, threads: int = 32, *,
                resuming: bool = False, evaluation: bool = False) -> CheckedSplit:
    """Load (if given a location) and check a split's shards; with skip_corrupt the bad ones are left out.

    Without skip_corrupt the first problem is a ShardError (naming how many more there are), whose advice fits
    the situation: a run resuming from a checkpoint (`resuming`), a split read for evaluation (`evaluation`).
    """
    if not isinstance(manifest, Manifest):
        manifest = Manifest.load(manifest)
    if manifest.split(split).indexed is not None:  # two files, read whole or not at all: skip_corrupt cannot apply
        ref = IndexedRef.of(manifest, split)
        problem = indexed_problem(ref)
        if problem:
            raise ShardError(problem)
        return CheckedSplit(manifest, split, (), (), manifest.fingerprint(), ref)
    refs = manifest.shard_refs(split)
    with ThreadPoolExecutor(max(1, min(threads, len(refs)))) as pool:
        problems = list(pool.map(partial(shard_problem, fix=advice(resuming=resuming, evaluation=evaluation)), refs))
    bad = [(r.tar, p) for r, p in zip(refs, problems) if p is not None]
    if bad and not skip_corrupt:
        more = f" ({len(bad) - 1} more shard(s) of split {split!r} have problems)" if len(bad) > 1 else ""
        raise ShardError(bad[0][1] + more)
    return CheckedSplit(manifest, split, tuple(r for r, p in zip(refs, problems) if p is None), tuple(bad),
                        manifest.fingerprint())
