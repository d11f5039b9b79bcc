"""The training loader: seeded, blended, multi-worker, exactly resumable, and independent of the DP layout.

Design (every choice serves exact resume and one data stream whatever the parallel layout):

* Each manifest split is a *source* of N sequences in shards. Epoch e of a source is a seeded
  permutation of its shards, each shard's sequences permuted by its own seeded permutation: an
  ordered list of all N sequences, different every epoch, identical on every run. Position k of a
  source's stream is entry k % N of epoch k // N, so every epoch gives every sequence exactly once
  (no remainder is dropped) and the stream runs across epoch ends forever.
* Blending makes one *global stream*: global sequence i comes from the source with the largest
  deficit w_d * (i+1) - consumed_d (Megatron's blending rule). The choice depends on the per-source
  consumed counts only, so every rank agrees and those counts are the state.
* Optimizer step j consumes global sequences [j*G, (j+1)*G), G = global batch (rows per step over
  all DP ranks and micro-batches). Micro-batch m of DP rank r holds rows [o, o+mb) of that batch,
  o = sedd_scale.noising.global_row_offset(m, r, mb, dp) = m*mb*dp + r*mb: the convention by which
  the trainer noises a row by its global index, and what Megatron's GPTDataset does. The union over
  ranks and micro-batches of a step is the same G sequences whatever dp, micro_batch and grad_accum
  are, so a checkpoint resharded to another layout with the same G trains on the same sequences.
* Each rank blends the whole global batch (G choices, cheap) to find its rows. The tradeoff: a
  global batch is a contiguous stretch of the stream and every rank has rows in every one, so every
  rank reads, sha256-checks and decodes every shard the stream passes through (per-rank blocks, the
  earlier design, read about 1/dp of them). A rank's decode work thus follows the job's global token
  rate, not its own; DataLoader workers share it. A rank's positions in a source only increase, so
  a cache of two decoded shards per source (per worker) decodes each shard once while it is in use.
* A rank's micro-batches are numbered t = 0, 1, ... (micro-batch t % A of step t // A, A = grad_accum
  = G / (mb*dp)). DataLoader worker w makes t = w, w+W, ...; the DataLoader's round robin returns them
  in order, so the batches do not depend on the number of workers (0 workers gives the same).
* The state counts only micro-batches handed to the trainer (not prefetched ones): completed steps,
  the per-source consumed counts after them, and the micro-batches of the current step this rank has
  already handed out. At a step boundary (micro == 0, where the trainer checkpoints) it is the same
  on every rank and under every layout, and a loader with any dp_size / micro_batch / worker count
  and the same global batch continues from it. A mid-step state resumes only under the same dp_size
  and micro_batch, since the rest of that step's rows are split by that layout.
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
from sedd_scale.noising import global_row_offset

STATE_FORMAT, STATE_VERSION = "sedd-scale-loader", 2


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
    global_batch: int | None = None  # sequences per optimizer step over all DP ranks; None: micro_batch * dp_size

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
        if self.global_batch is not None and (self.global_batch < 1 or self.global_batch % self.micro_batch):
            raise ValueError(f"global_batch must be a positive multiple of micro_batch={self.micro_batch}, "
                             f"got {self.global_batch}")
        if self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError(f"num_workers must be >= 0 and prefetch_factor >= 1, got {self.num_workers}, "
                             f"{self.prefetch_factor}")


class _Source:
    """One manifest split: maps positions of its global stream to sequences."""

    _CACHE = 2  # shards kept decoded: positions only increase, so a micro-batch touches at most two in a row

    def __init__(self, manifest: Manifest, split: str, index: int, seed: int, skip_corrupt: bool, verify: bool):
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
        """The sequences at stream `positions` of this source, shape (len(positions), seq_len)."""
        out = np.empty((len(positions), self.seq_len), dtype=self.manifest.np_dtype)
        epochs, q = np.divmod(positions, self.total)  # q: position in the epoch's order of all N sequences
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
    sources = range(len(w))
    total = sum(consumed)
    for k in range(n):
        i1 = total + k + 1
        d = max(sources, key=lambda s: (w[s] * i1 - consumed[s], -s))
        consumed[d] += 1
        choices[k] = d
    return choices, consumed


def _plan(weights: np.ndarray, consumed: list[int], global_batch: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Source and source-stream position of each row of the global batch starting at `consumed`; counts after."""
    choices, after = _blend(weights, consumed, global_batch)
    if len(consumed) == 1:
        return choices, consumed[0] + np.arange(global_batch, dtype=np.int64), after
    positions = np.empty(global_batch, dtype=np.int64)
    for d, start in enumerate(consumed):
        rows = np.flatnonzero(choices == d)
        positions[rows] = start + np.arange(len(rows))
    return choices, positions, after


class _BatchStream(IterableDataset):
    """One rank's infinite micro-batches from a state; worker w makes the rank's micro-batches w, w+W, ..."""

    def __init__(self, sources: list[_Source], weights: np.ndarray, global_batch: int, micro_batch: int,
                 dp_rank: int, dp_size: int, steps: int, consumed: list[int], micro: int):
        self.sources, self.weights, self.global_batch = sources, weights, global_batch
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.accum = global_batch // (micro_batch * dp_size)
        self.steps, self.consumed, self.micro = steps, list(consumed), micro

    def __iter__(self) -> Iterator[tuple[torch.Tensor, tuple[int, list[int], int]]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mb, seq_len = self.micro_batch, self.sources[0].seq_len
        step, consumed, first, t = self.steps, list(self.consumed), self.micro, 0
        while True:
            choices, positions, after = _plan(self.weights, consumed, self.global_batch)
            for m in range(first, self.accum):
                if t % num_workers == worker:
                    o = global_row_offset(m, self.dp_rank, mb, self.dp_size)
                    src, pos = choices[o:o + mb], positions[o:o + mb]
                    out = np.empty((mb, seq_len), dtype=np.int64)
                    for d in np.unique(src):
                        rows = np.flatnonzero(src == d)
                        out[rows] = self.sources[d].gather(pos[rows])
                    # the state once the trainer has this micro-batch: counts move on only at a step's end
                    state = (step + 1, after, 0) if m + 1 == self.accum else (step, consumed, m + 1)
                    yield torch.from_numpy(out), state
                t += 1
            step, consumed, first = step + 1, after, 0


class TokenLoader:
    """Infinite (micro_batch, seq_len) LongTensor micro-batches for one data-parallel rank, exactly resumable.

    The rank's rows of each global batch of `config.global_batch` sequences; the stream of global
    batches does not depend on dp_size, micro_batch or the number of workers.
    """

    def __init__(self, config: LoaderConfig, dp_rank: int = 0, dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.config, self.dp_rank, self.dp_size = config, dp_rank, dp_size
        mb = config.micro_batch
        self.global_batch = config.global_batch if config.global_batch is not None else mb * dp_size
        if self.global_batch % (mb * dp_size):
            raise ValueError(f"global_batch={self.global_batch} is not a multiple of micro_batch x dp_size = "
                             f"{mb} x {dp_size} = {mb * dp_size}: every rank must get the same whole number of "
                             "micro-batches (gradient accumulation steps) per optimizer step")
        self.grad_accum = self.global_batch // (mb * dp_size)
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
        self.sources = [_Source(m, config.split, i, config.seed, config.skip_corrupt, config.verify_sha256)
                        for i, m in enumerate(self.manifests)]
        for m, s in zip(self.manifests, self.sources):
            # The stream needs only N >= 1; a split that cannot give each rank one sequence per epoch is a
            # preparation mistake (seq_len too long for the corpus, the wrong split), so say so up front.
            if s.total < dp_size:
                raise ManifestError(f"split {config.split!r} of {m.path} has {s.total} usable sequences, fewer than "
                                    f"the {dp_size} data-parallel ranks: prepare more data or a shorter --seq-len")
        raw = config.weights if config.weights is not None else [s.total for s in self.sources]
        self.weights = np.asarray(raw, dtype=np.float64) / float(sum(raw))
        self.skipped_shards: list[str] = [p for s in self.sources for p in s.skipped]
        self._fingerprints = [m.fingerprint() for m in self.manifests]
        self.steps = 0  # optimizer steps (global batches) completed by the micro-batches handed out
        self.micro = 0  # micro-batches of the current step handed out by this rank
        self._consumed = [0] * len(self.sources)  # per source, after `steps` global batches
        self._generation = 0

    @property
    def sequences_per_epoch(self) -> list[int]:
        """Sequences in one epoch of each source: all of its usable sequences (the global stream has no remainder)."""
        return [s.total for s in self.sources]

    @property
    def epochs(self) -> list[float]:
        """Epochs of each source consumed by the completed global batches."""
        return [c / s.total for c, s in zip(self._consumed, self.sources)]

    def check_compatible(self, vocab_size: int, seq_len: int) -> None:
        """Refuse a recipe whose tokenizer vocabulary or sequence length differs from the manifests'."""
        for m in self.manifests:
            m.check_compatible(vocab_size, seq_len)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Micro-batches from the current state on, forever; a new iterator continues where the last one stopped."""
        self._generation += 1
        generation = self._generation
        stream = _BatchStream(self.sources, self.weights, self.global_batch, self.config.micro_batch, self.dp_rank,
                              self.dp_size, self.steps, self._consumed, self.micro)
        if self.config.num_workers == 0:
            batches = iter(stream)
        else:
            batches = iter(DataLoader(stream, batch_size=None, num_workers=self.config.num_workers,
                                      prefetch_factor=self.config.prefetch_factor))
        for tokens, (steps, consumed, micro) in batches:
            if generation != self._generation:
                raise RuntimeError("this TokenLoader was re-iterated or its state was loaded: "
                                   "this older iterator is stale, use the new one")
            self.steps, self._consumed, self.micro = int(steps), [int(c) for c in consumed], int(micro)
            yield tokens

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.config.seed, "split": self.config.split, "seq_len": self.config.seq_len,
                "global_batch": self.global_batch,
                "sources": [{"manifest": str(m.path), "fingerprint": f, "weight": float(w), "skipped": s.skipped}
                            for m, f, s, w in zip(self.manifests, self._fingerprints, self.sources, self.weights)]}

    def state_dict(self) -> dict[str, Any]:
        """The stream position (steps, per-source consumed, micro) plus what must match on resume.

        At a step boundary (micro == 0) it is the same on every rank and under every DP layout; mid-step
        it also records the dp_size and micro_batch that split the current step.
        """
        layout = None if self.micro == 0 else {"dp_size": self.dp_size, "micro_batch": self.config.micro_batch}
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "steps": self.steps,
                "consumed": list(self._consumed), "micro": self.micro, "layout": layout, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the micro-batches recorded in `state` (from any rank, any DP layout at a step
        boundary); refuse a state from different data, another global batch, or a mid-step state of another layout."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} state dict")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"the loader state is version {state.get('version')}, this loader reads version "
                             f"{STATE_VERSION} (one global stream split over DP ranks; version 1 had per-rank "
                             "blocks): it cannot be continued exactly, start the data stream afresh")
        mine = self._identity()
        if state["global_batch"] != self.global_batch:
            raise ValueError(f"the loader state was saved with a global batch of {state['global_batch']} sequences "
                             f"per optimizer step, this run has {self.global_batch}: step j reads global sequences "
                             "[j*G, (j+1)*G), so resuming would shift the stream. Keep the global batch "
                             "(dp x micro_batch x grad_accum) when changing the layout")
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
        micro = int(state["micro"])
        if micro:
            saved = state["layout"]
            here = {"dp_size": self.dp_size, "micro_batch": self.config.micro_batch}
            if saved != here:
                raise ValueError(
                    f"the loader state was saved in the middle of an optimizer step ({micro} micro-batches of it "
                    f"handed out) with dp_size={saved['dp_size']}, micro_batch={saved['micro_batch']}; this loader "
                    f"has dp_size={self.dp_size}, micro_batch={self.config.micro_batch}: the rest of that step's "
                    "rows are split by the saved layout. Resume mid-step with the same dp_size and micro_batch, or "
                    "reshard from a state saved at a step boundary (the trainer's checkpoints are)")
            if not 0 < micro < self.grad_accum:
                raise ValueError(f"loader state has micro={micro}, outside [0, grad_accum={self.grad_accum})")
        self.steps, self._consumed, self.micro = int(state["steps"]), [int(c) for c in state["consumed"]], micro
        self._generation += 1  # an iterator made before this load is stale


class EvalBatch(NamedTuple):
    """An evaluation batch: tokens (micro_batch, seq_len), which rows are real (the rest is EOS padding),
    and its global index (rank r's g-th batch is g * dp_size + r: the same rows under any DP size)."""

    tokens: torch.Tensor
    valid: torch.Tensor
    index: int


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
            yield EvalBatch(torch.from_numpy(tokens), torch.from_numpy(valid), g * self.dp_size + self.dp_rank)
