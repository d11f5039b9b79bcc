"""The training loader: seeded, DP-partitioned, blended, multi-worker and exactly resumable.

Design (every choice serves exact resume and equal batch counts):

* Each manifest split is a *source* of N sequences in shards. Epoch e of a source is a seeded
  permutation of its shards, each shard's sequences permuted by its own seeded permutation:
  an ordered list of all N sequences, different every epoch, identical on every run.
* Data-parallel partitioning is by contiguous blocks of that list: rank r owns positions
  [r*n, (r+1)*n) with n = N // dp_size, so a rank reads about 1/dp of the shards (a small corpus
  in a single shard works too). The last N - dp*n (< dp_size) sequences of each epoch are the
  documented remainder; they differ per epoch, so nothing is skipped systematically.
* A rank's stream for a source is its block of epoch 0, then of epoch 1, ... (infinite), so
  every rank yields the same number of batches, forever, and batches run across epoch ends.
* Blending is per sequence and deterministic: the i-th sequence of a rank's stream comes from
  the source with the largest deficit w_d * (i+1) - consumed_d (Megatron's blending rule). The
  choice depends on i only, so all ranks agree and the per-source consumed counts are the state.
* Batch j is stream sequences [j*mb, (j+1)*mb). DataLoader worker w makes batches j = w, w+W,
  ...; the DataLoader's round-robin returns them in order, so the stream does not depend on the
  number of workers (and 0 workers gives the same batches).
* The state is the per-source consumed counts (after the batches the trainer received, not the
  ones prefetched). Restoring it continues with exactly the next sequences; micro batch size and
  worker count may change. The rank blocks depend on dp_size, so a different dp_size is refused.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sedd_scale.data.manifest import Manifest, ManifestError, ShardInfo
from sedd_scale.data.shards import check_present, read_shard, verify_shard

STATE_FORMAT, STATE_VERSION = "sedd-scale-loader", 1


@dataclass
class LoaderConfig:
    """What the training loader reads and how it batches."""

    manifests: list[str]  # manifest.json paths; several are blended
    seq_len: int
    micro_batch: int  # sequences per batch (per DP rank)
    weights: list[float] | None = None  # blend weights; None: proportional to each split's sequence count
    seed: int = 0
    num_workers: int = 0  # DataLoader worker processes
    split: str = "train"
    skip_corrupt: bool = False  # opt-in: verify all shards at start and leave out the bad ones
    verify_sha256: bool = True  # check each shard's sha256 when it is read
    prefetch_factor: int = 4  # batches in flight per worker

    def __post_init__(self):
        if not self.manifests:
            raise ValueError("manifests needs at least one manifest path")
        self.manifests = [str(m) for m in self.manifests]
        if self.weights is not None:
            if len(self.weights) != len(self.manifests):
                raise ValueError(f"weights has {len(self.weights)} entries for {len(self.manifests)} manifests")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"weights must be >= 0 with a positive sum, got {self.weights}")
        if self.seq_len < 1 or self.micro_batch < 1:
            raise ValueError(f"seq_len and micro_batch must be >= 1, got {self.seq_len}, {self.micro_batch}")
        if self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError(f"num_workers must be >= 0 and prefetch_factor >= 1, got {self.num_workers}, "
                             f"{self.prefetch_factor}")


class _Source:
    """One manifest split seen by one DP rank: maps stream positions to sequences."""

    _CACHE = 2  # shards kept decoded: a batch touches at most two consecutive ones

    def __init__(self, manifest: Manifest, split: str, index: int, seed: int, dp_rank: int, dp_size: int,
                 skip_corrupt: bool, verify: bool):
        self.manifest, self.index, self.seed, self.verify = manifest, index, seed, verify
        self.seq_len, self.dtype = manifest.seq_len, manifest.dtype
        shards = [(manifest.shard_path(s), s) for s in manifest.split(split).shards]
        self.skipped: list[str] = []
        if skip_corrupt:
            good = []
            for path, info in shards:
                problem = verify_shard(path, info, self.seq_len, self.dtype)
                (self.skipped.append(str(path)) if problem else good.append((path, info)))
            shards = good
        else:
            for path, info in shards:  # a missing or truncated shard fails now, not hours into training
                check_present(path, info)
        self.shards: list[tuple[Path, ShardInfo]] = shards
        self.sizes = np.array([info.num_sequences for _, info in shards], dtype=np.int64)
        self.total = int(self.sizes.sum())
        self.dp_rank, self.per_rank = dp_rank, self.total // dp_size
        if self.per_rank == 0:
            raise ManifestError(f"split {split!r} of {manifest.path} has {self.total} usable sequences, fewer than "
                                f"the {dp_size} data-parallel ranks: prepare more data or a shorter --seq-len")
        self._rows: OrderedDict[int, np.ndarray] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._layouts: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __getstate__(self):  # workers start with empty caches
        return {**self.__dict__, "_rows": OrderedDict(), "_perms": OrderedDict(), "_layouts": OrderedDict()}

    @staticmethod
    def _cached(cache: OrderedDict, key, make, size: int):
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = cache[key] = make()
        while len(cache) > size:
            cache.popitem(last=False)
        return value

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        def make():
            order = np.random.default_rng([self.seed, self.index, epoch]).permutation(len(self.shards))
            return order, np.cumsum(self.sizes[order])
        return self._cached(self._layouts, epoch, make, 2)

    def _perm(self, epoch: int, shard: int) -> np.ndarray:
        return self._cached(self._perms, (epoch, shard), lambda: np.random.default_rng(
            [self.seed, self.index, epoch, shard]).permutation(int(self.sizes[shard])), 2 * self._CACHE)

    def _shard_rows(self, shard: int) -> np.ndarray:
        path, info = self.shards[shard]
        return self._cached(self._rows, shard, lambda: read_shard(path, info, self.seq_len, self.dtype, self.verify),
                            self._CACHE)

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The sequences at this rank's stream `positions`, shape (len(positions), seq_len)."""
        out = np.empty((len(positions), self.seq_len), dtype=self.manifest.np_dtype)
        epochs = positions // self.per_rank
        q = self.dp_rank * self.per_rank + positions % self.per_rank  # position in the epoch's global order
        for epoch in np.unique(epochs):
            in_epoch = np.flatnonzero(epochs == epoch)
            order, ends = self._layout(int(epoch))
            slots = np.searchsorted(ends, q[in_epoch], side="right")
            for slot in np.unique(slots):
                rows = in_epoch[slots == slot]
                shard = int(order[slot])
                within = q[rows] - (ends[slot] - self.sizes[shard])
                out[rows] = self._shard_rows(shard)[self._perm(int(epoch), shard)[within]]
        return out


def _blend(weights: np.ndarray, consumed: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """Sources of the next n sequences (largest-deficit rule) and the consumed counts after them."""
    consumed = list(consumed)
    if len(weights) == 1:
        return np.zeros(n, dtype=np.int64), [consumed[0] + n]
    choices = np.empty(n, dtype=np.int64)
    w = weights.tolist()
    for k in range(n):
        i1 = sum(consumed) + 1
        d = max(range(len(w)), key=lambda s: (w[s] * i1 - consumed[s], -s))
        consumed[d] += 1
        choices[k] = d
    return choices, consumed


class _BatchStream(IterableDataset):
    """Infinite batches of one rank from a consumed-counts state; worker w makes batches w, w+W, ..."""

    def __init__(self, sources: list[_Source], weights: np.ndarray, micro_batch: int, consumed: list[int]):
        self.sources, self.weights, self.micro_batch = sources, weights, micro_batch
        self.consumed = list(consumed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, tuple[int, ...]]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        consumed, j = list(self.consumed), 0
        seq_len = self.sources[0].seq_len
        while True:
            choices, after = _blend(self.weights, consumed, self.micro_batch)
            if j % num_workers == worker:
                out = np.empty((self.micro_batch, seq_len), dtype=np.int64)
                for d in np.unique(choices):
                    rows = np.flatnonzero(choices == d)
                    out[rows] = self.sources[d].gather(consumed[d] + np.arange(len(rows)))
                yield torch.from_numpy(out), tuple(after)
            consumed, j = after, j + 1


class TokenLoader:
    """Infinite (micro_batch, seq_len) LongTensor batches for one data-parallel rank, exactly resumable."""

    def __init__(self, config: LoaderConfig, dp_rank: int = 0, dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.config, self.dp_rank, self.dp_size = config, dp_rank, dp_size
        self.manifests = [Manifest.load(p) for p in config.manifests]
        first = self.manifests[0]
        for m in self.manifests:
            if m.seq_len != config.seq_len:
                raise ManifestError(f"manifest {m.path} holds sequences of {m.seq_len} tokens, the loader is "
                                    f"configured for {config.seq_len}: prepare the data with --seq-len "
                                    f"{config.seq_len} or change seq_len")
            if m.tokenizer != first.tokenizer:
                raise ManifestError(f"cannot blend {m.path} ({m.tokenizer}) with {first.path} ({first.tokenizer}): "
                                    "all manifests must use the same tokenizer")
        self.sources = [_Source(m, config.split, i, config.seed, dp_rank, dp_size, config.skip_corrupt,
                                config.verify_sha256) for i, m in enumerate(self.manifests)]
        raw = config.weights if config.weights is not None else [s.total for s in self.sources]
        self.weights = np.asarray(raw, dtype=np.float64) / float(sum(raw))
        self.skipped_shards: list[str] = [p for s in self.sources for p in s.skipped]
        self._fingerprints = [m.fingerprint() for m in self.manifests]
        self._consumed = [0] * len(self.sources)
        self.step = 0  # batches handed out since the start (or the restored state)
        self._generation = 0

    @property
    def sequences_per_epoch(self) -> list[int]:
        """Sequences each source gives this rank per epoch (the same on every rank)."""
        return [s.per_rank for s in self.sources]

    @property
    def epochs(self) -> list[float]:
        """Epochs of each source consumed so far by this rank."""
        return [c / s.per_rank for c, s in zip(self._consumed, self.sources)]

    def check_compatible(self, vocab_size: int, seq_len: int) -> None:
        """Refuse a recipe whose tokenizer vocabulary or sequence length differs from the manifests'."""
        for m in self.manifests:
            m.check_compatible(vocab_size, seq_len)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches from the current state on, forever; a new iterator continues where the last one stopped."""
        self._generation += 1
        generation = self._generation
        stream = _BatchStream(self.sources, self.weights, self.config.micro_batch, self._consumed)
        if self.config.num_workers == 0:
            batches = iter(stream)
        else:
            batches = iter(DataLoader(stream, batch_size=None, num_workers=self.config.num_workers,
                                      prefetch_factor=self.config.prefetch_factor))
        for tokens, consumed in batches:
            if generation != self._generation:
                raise RuntimeError("this TokenLoader was re-iterated or its state was loaded: "
                                   "this older iterator is stale, use the new one")
            self._consumed, self.step = list(consumed), self.step + 1
            yield tokens

    def _identity(self) -> dict[str, Any]:
        return {"dp_size": self.dp_size, "seed": self.config.seed, "split": self.config.split,
                "seq_len": self.config.seq_len,
                "sources": [{"manifest": str(m.path), "fingerprint": f, "weight": float(w), "skipped": s.skipped}
                            for m, f, s, w in zip(self.manifests, self._fingerprints, self.sources, self.weights)]}

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: per-source consumed sequences plus what must match on resume."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "dp_rank": self.dp_rank, "step": self.step,
                "consumed": list(self._consumed), **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the batches recorded in `state`; refuse a state from different data or DP size."""
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a {STATE_FORMAT} v{STATE_VERSION} state dict")
        if state["dp_size"] != self.dp_size:
            raise ValueError(
                f"the loader state was saved with dp_size={state['dp_size']} but this run has dp_size={self.dp_size}: "
                "each rank's share of every epoch depends on dp_size, so resuming would repeat or skip sequences. "
                f"Resume with {state['dp_size']} data-parallel ranks (e.g. change tp/pp instead), or start the data "
                "stream afresh")
        if state["dp_rank"] != self.dp_rank:
            raise ValueError(f"loader state of dp_rank {state['dp_rank']} given to dp_rank {self.dp_rank}: "
                             "each rank must load its own state")
        mine = self._identity()
        for key in ("seed", "split", "seq_len"):
            if state[key] != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader {mine[key]!r}: "
                                 "resuming would read a different stream")
        if len(state["sources"]) != len(mine["sources"]):
            raise ValueError(f"loader state blends {len(state['sources'])} manifests, this loader "
                             f"{len(mine['sources'])}")
        for old, new in zip(state["sources"], mine["sources"]):
            for key, what in (("fingerprint", "the manifest's content changed"),
                              ("weight", "the blend weight changed"),
                              ("skipped", "a different set of corrupt shards is skipped")):
                if old[key] != new[key]:
                    raise ValueError(f"cannot resume on {new['manifest']}: {what} since the state was saved "
                                     f"({old[key]!r} -> {new[key]!r}); resuming would not continue the same stream")
        self._consumed, self.step = [int(c) for c in state["consumed"]], int(state["step"])
        self._generation += 1  # an iterator made before this load is stale


class EvalBatch(NamedTuple):
    """An evaluation batch: tokens (micro_batch, seq_len) and which rows are real (the rest is EOS padding)."""

    tokens: torch.Tensor
    valid: torch.Tensor


@dataclass
class EvalLoader:
    """One ordered pass over a split, partitioned over DP ranks; every rank yields the same number of batches.

    Global batch g holds sequences [g*dp*mb, (g+1)*dp*mb) and rank r its r-th slice of mb, so each
    sequence is evaluated exactly once; past the end, rows are EOS with valid=False.
    """

    manifest: str
    split: str
    micro_batch: int
    dp_rank: int = 0
    dp_size: int = 1
    verify_sha256: bool = True
    _manifest: Manifest = field(init=False, repr=False)

    def __post_init__(self):
        if not 0 <= self.dp_rank < self.dp_size or self.micro_batch < 1:
            raise ValueError(f"need 0 <= dp_rank < dp_size and micro_batch >= 1, got {self.dp_rank}, "
                             f"{self.dp_size}, {self.micro_batch}")
        self._manifest = Manifest.load(self.manifest)
        self._info = self._manifest.split(self.split)
        for shard in self._info.shards:
            check_present(self._manifest.shard_path(shard), shard)

    def check_compatible(self, vocab_size: int, seq_len: int) -> None:
        """Refuse a recipe whose tokenizer vocabulary or sequence length differs from the manifest's."""
        self._manifest.check_compatible(vocab_size, seq_len)

    @property
    def num_sequences(self) -> int:
        """Sequences in the split (over all ranks)."""
        return self._info.num_sequences

    def __len__(self) -> int:
        """Batches per rank."""
        return -(-self._info.num_sequences // (self.dp_size * self.micro_batch))

    def __iter__(self) -> Iterator[EvalBatch]:
        """The rank's batches, in order."""
        m, mb = self._manifest, self.micro_batch
        ends = np.cumsum([s.num_sequences for s in self._info.shards])
        loaded: tuple[int, np.ndarray] | None = None
        for g in range(len(self)):
            start = (g * self.dp_size + self.dp_rank) * mb
            idx = np.arange(start, start + mb)
            valid = idx < self._info.num_sequences
            tokens = np.full((mb, m.seq_len), m.tokenizer.eos_id, dtype=np.int64)
            for row in np.flatnonzero(valid):
                shard = int(np.searchsorted(ends, idx[row], side="right"))
                if loaded is None or loaded[0] != shard:
                    info = self._info.shards[shard]
                    loaded = shard, read_shard(m.shard_path(info), info, m.seq_len, m.dtype, self.verify_sha256)
                tokens[row] = loaded[1][idx[row] - (ends[shard] - self._info.shards[shard].num_sequences)]
            yield EvalBatch(torch.from_numpy(tokens), torch.from_numpy(valid))
