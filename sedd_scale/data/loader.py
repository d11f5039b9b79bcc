"""The training loader: one global, seeded, blended stream, globally shuffled, split over DP ranks and workers,
exactly resumable; each rank reads only the bytes of its own rows.

Design (every choice serves exact resume and one data stream whatever the parallel layout):

* Each manifest split is a *source* of N sequences in shards, cut into blocks of B consecutive
  sequences, B = the manifest's seqs_per_sample: a block is one tar sample (16 KiB of ids by
  default), only the split's last one may be short. Epoch e of a source visits every block in the
  order of a keyed permutation of [0, N_blocks) chosen by (seed, source, e) (`permutation.py`: a
  Feistel network with cycle-walking, evaluated per position in O(1) memory, so a 10^10-sequence
  source starts instantly), each block's sequences in order. Position k of a source's stream is
  entry k % N of epoch k // N, so every epoch gives every sequence exactly once (no remainder is
  dropped) and the stream runs across epoch ends forever. A global batch of G sequences is G / B
  blocks drawn from the whole corpus, not a stretch of one or two shards.
* Blending makes one *global stream*: global sequence i comes from the source with the largest
  deficit w_d * (i+1) - consumed_d (Megatron's blending rule). The choice depends on the per-source
  consumed counts only, so every rank agrees and those counts are the state.
* Optimizer step j consumes global sequences [j*G, (j+1)*G), G = global batch (rows per step over
  all DP ranks and micro-batches). Micro-batch m of DP rank r holds rows [o, o+mb) of that batch,
  o = sedd_scale.layout.row_offset(m, r, mb, dp) = m*mb*dp + r*mb: the convention by which
  the trainer noises a row by its global index, and what Megatron's GPTDataset does. The union over
  ranks and micro-batches of a step is the same G sequences whatever dp, micro_batch and grad_accum
  are, so a checkpoint resharded to another layout with the same G trains on the same sequences.
* Each rank blends the whole global batch (G choices, cheap) to find its rows, maps them to (shard,
  row) and reads exactly their bytes (`reader.py`: one pread per run of consecutive rows, readahead
  off, every row's CRC32 checked). With micro_batch a multiple of B a micro-batch is whole samples;
  with a smaller one, the ranks of a node together read whole samples. Nothing is decoded or hashed
  whole, and a rank's read volume follows its own token rate.
* A rank's micro-batches are numbered t = 0, 1, ... (micro-batch t % A of step t // A, A = grad_accum
  = G / (mb*dp)). DataLoader worker w makes t = w, w+W, ... and reads only their rows; the
  DataLoader's round robin returns them in order, so the batches do not depend on the number of
  workers (0 workers gives the same).
* The state counts only micro-batches handed to the trainer (not prefetched ones): completed steps,
  the per-source consumed counts after them, and the micro-batches of the current step this rank has
  already handed out. At a step boundary (micro == 0, where the trainer checkpoints) it is the same
  on every rank and under every layout, and a loader with any dp_size / micro_batch / worker count
  and the same global batch continues from it. A mid-step state resumes only under the same dp_size
  and micro_batch, since the rest of that step's rows are split by that layout.
* A source may instead be a split of a Megatron indexed dataset (`indexed.py`): its N sequences are
  the rows of its documents' concatenated stream, read in place through megatron-core's reader;
  everything above (blocks, shuffle, blending, rows per rank, state) is the same.
* Startup: the per-shard metadata work (loading manifests, one stat per shard and sidecar) is
  `check_sources`, which rank 0 runs and the trainer broadcasts (`TokenLoader(..., checked=...)`);
  without it each loader checks for itself (one process, tests, tools).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sedd_scale.data.checked import CheckedSplit, check_split
from sedd_scale.data.fetch import cache_dir
from sedd_scale.data.indexed import IndexedRows
from sedd_scale.data.manifest import Manifest, ManifestError
from sedd_scale.data.permutation import KeyedPermutation
from sedd_scale.data.prompts import split_prompts
from sedd_scale.data.reader import RowReader
from sedd_scale.data.urlcache import UrlCache, is_url
from sedd_scale.layout import row_offset

STATE_FORMAT, STATE_VERSION = "sedd-scale-loader", 3


@dataclass
class LoaderConfig:
    """What the training loader reads and how it batches."""

    manifests: list[str]  # manifest.json paths or URLs; several are blended
    seq_len: int
    micro_batch: int  # sequences per batch (per DP rank)
    weights: list[float] | None = None  # blend weights; None: proportional to each split's sequence count
    seed: int = 0
    num_workers: int = 0  # DataLoader worker processes
    split: str = "train"
    skip_corrupt: bool = False  # opt-in: leave out shards that are missing or of the wrong size (counted)
    verify_crc: bool = True  # check every row read against its CRC32
    prefetch_factor: int = 4  # batches in flight per worker
    global_batch: int | None = None  # sequences per optimizer step over all DP ranks; None: micro_batch * dp_size
    cache_dir: str | None = None  # where URL shards are fetched to; None: $SEDD_CACHE/shards
    max_open_files: int = 64  # descriptors kept open per source and worker

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
        if self.num_workers < 0 or self.prefetch_factor < 1 or self.max_open_files < 2:
            raise ValueError(f"num_workers must be >= 0, prefetch_factor >= 1 and max_open_files >= 2, got "
                             f"{self.num_workers}, {self.prefetch_factor}, {self.max_open_files}")


def shard_cache(directory: str | None) -> UrlCache:
    """The cache URL shards are fetched into: `directory`, default $SEDD_CACHE/shards."""
    return UrlCache(directory if directory is not None else cache_dir() / "shards")


def rows_reader(checked: CheckedSplit, *, verify: bool, cache: UrlCache, max_open: int = 64
                ) -> RowReader | IndexedRows:
    """What reads a checked split's rows: shards by byte range (CRC32-checked), or a Megatron indexed dataset."""
    if checked.indexed is not None:
        return IndexedRows(checked.indexed)
    m = checked.manifest
    return RowReader(m.layout, m.np_dtype, verify=verify, max_open=max_open, cache=cache)


def check_sources(config: LoaderConfig, resuming: bool = False) -> list[CheckedSplit]:
    """Load the config's manifests and check their splits' shards (rank 0's startup work, shared with the others).

    Refuses manifests that cannot be blended (sequence length, tokenizer) before any shard is touched; `resuming`
    (a run continuing from a checkpoint) fits the advice of a shard problem to that situation.
    """
    manifests = [Manifest.load(p) for p in config.manifests]
    first = manifests[0]
    for m in manifests:
        if m.seq_len != config.seq_len:
            raise ManifestError(f"manifest {m.location} holds sequences of {m.seq_len} tokens, the loader is "
                                f"configured for {config.seq_len}: prepare the data with --seq-len "
                                f"{config.seq_len} or change seq_len")
        if m.tokenizer != first.tokenizer:
            raise ManifestError(f"cannot blend {m.location} ({m.tokenizer.describe()}) with {first.location} "
                                f"({first.tokenizer.describe()}): all manifests must use the same tokenizer")
    return [check_split(m, config.split, config.skip_corrupt, resuming=resuming) for m in manifests]


class _Source:
    """One checked manifest split: maps positions of its stream to sequences, and reads them."""

    def __init__(self, checked: CheckedSplit, index: int, seed: int, reader: RowReader | IndexedRows):
        self.index, self.seed, self.reader = index, seed, reader
        self.shards = checked.shards
        self.seq_len = checked.manifest.row_width  # conditional rows end with their prompt length
        sizes = np.array([r.info.num_sequences for r in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # first sequence of each usable shard
        self.total = checked.num_sequences
        self.block = checked.manifest.seqs_per_sample  # B: a block of the shuffle is one tar sample
        self.num_blocks = -(-self.total // self.block)
        self.short = self.total - (self.num_blocks - 1) * self.block  # size of the last block, in [1, B]
        self._orders: OrderedDict[int, tuple[KeyedPermutation, int]] = OrderedDict()

    def _order(self, epoch: int) -> tuple[KeyedPermutation, int]:
        """Epoch `epoch`'s block order and the slot at which its short (last) block comes."""
        if epoch not in self._orders:
            perm = KeyedPermutation(self.num_blocks, (self.seed, self.index, epoch))
            self._orders[epoch] = perm, int(perm.inverse(np.array([self.num_blocks - 1]))[0])
            while len(self._orders) > 2:  # positions only increase: at most two epochs are in use
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def sequences(self, positions: np.ndarray) -> np.ndarray:
        """Sequence index (in the usable shards, in order) at each stream position."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, q = np.divmod(positions, self.total)  # q: position in its epoch
        out = np.empty_like(q)
        b, short = self.block, self.short
        for epoch in np.unique(epochs):
            i = np.flatnonzero(epochs == epoch)
            perm, slot_of_short = self._order(int(epoch))
            # Slots before the short block hold B positions each, it holds `short`, the ones after B again:
            # shift the positions after it as if it were full.
            qe = q[i]
            slot, offset = np.divmod(np.where(qe >= slot_of_short * b + short, qe + (b - short), qe), b)
            out[i] = perm(slot) * b + offset
        return out

    def read(self, positions: np.ndarray) -> np.ndarray:
        """The sequences at stream `positions`, shape (len(positions), seq_len), reading only their bytes."""
        return self.read_sequences(self.sequences(positions))

    def read_sequences(self, seqs: np.ndarray) -> np.ndarray:
        """Sequences by index in the usable shards, shape (len(seqs), seq_len) int64."""
        if isinstance(self.reader, IndexedRows):  # rows of one stream: no shards to map them to
            return self.reader.read(seqs)
        shard = np.searchsorted(self.starts, seqs, side="right") - 1
        out = np.empty((len(seqs), self.seq_len), dtype=np.int64)
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            out[rows] = self.reader.read(self.shards[s], seqs[rows] - self.starts[s])
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
                    o = row_offset(m, self.dp_rank, mb, self.dp_size)
                    src, pos = choices[o:o + mb], positions[o:o + mb]
                    out = np.empty((mb, seq_len), dtype=np.int64)
                    for d in np.unique(src):
                        rows = np.flatnonzero(src == d)
                        out[rows] = self.sources[d].read(pos[rows])
                    # the state once the trainer has this micro-batch: counts move on only at a step's end
                    state = (step + 1, after, 0) if m + 1 == self.accum else (step, consumed, m + 1)
                    yield torch.from_numpy(out), state
                t += 1
            step, consumed, first = step + 1, after, 0


class TokenLoader:
    """Infinite (micro_batch, seq_len) LongTensor micro-batches for one data-parallel rank, exactly resumable
    ((micro_batch, seq_len + 1) for conditional data: `conditional`).

    The rank's rows of each global batch of `config.global_batch` sequences; the stream of global
    batches does not depend on dp_size, micro_batch or the number of workers.
    """

    def __init__(self, config: LoaderConfig, dp_rank: int = 0, dp_size: int = 1,
                 checked: list[CheckedSplit] | None = None):
        """`checked`: `check_sources(config)` as rank 0 computed it (None: check here)."""
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
        if checked is None:
            checked = check_sources(config)
        elif [(c.manifest.location, c.split) for c in checked] != [(m, config.split) for m in config.manifests]:
            raise ValueError(f"checked splits {[(c.manifest.location, c.split) for c in checked]} are not this "
                             f"config's manifests {config.manifests} (split {config.split!r}): pass "
                             "check_sources(config) of the same config")
        self.checked = checked
        self.manifests = [c.manifest for c in checked]
        kinds = {m.conditional for m in self.manifests}
        if len(kinds) > 1:
            kinds = ", ".join(f"{m.location}: {'SFT' if m.conditional else 'plain'}" for m in self.manifests)
            raise ManifestError(f"data.manifests mixes prompt/response (SFT) data and plain token data ({kinds}): "
                                "blend manifests of one kind")
        cache = shard_cache(config.cache_dir)
        if any(is_url(r.tar) for c in checked for r in c.shards):
            cache.check_writable()  # on every rank: each node has its own cache
        self.sources = []
        for i, c in enumerate(checked):
            m = c.manifest
            reader = rows_reader(c, verify=config.verify_crc, max_open=config.max_open_files, cache=cache)
            self.sources.append(_Source(c, i, config.seed, reader))
            # The stream needs only N >= 1; a split that cannot give each rank one sequence per epoch is a
            # preparation mistake (seq_len too long for the corpus, the wrong split), so say so up front.
            if self.sources[-1].total < dp_size:
                raise ManifestError(f"split {config.split!r} of {m.location} has {self.sources[-1].total} usable "
                                    f"sequences, fewer than the {dp_size} data-parallel ranks: prepare more data or "
                                    "a shorter --seq-len")
        raw = config.weights if config.weights is not None else [s.total for s in self.sources]
        self.weights = np.asarray(raw, dtype=np.float64) / float(sum(raw))
        self.skipped_shards: list[str] = [location for c in checked for location, _ in c.skipped]
        self.steps = 0  # optimizer steps (global batches) completed by the micro-batches handed out
        self.micro = 0  # micro-batches of the current step handed out by this rank
        self._consumed = [0] * len(self.sources)  # per source, after `steps` global batches
        self._generation = 0

    @property
    def conditional(self) -> bool:
        """Whether the rows are prompt/response data: each yielded row then ends with its prompt length
        (`prompts.split_prompts` turns a batch into tokens and prompt mask)."""
        return self.manifests[0].conditional

    @property
    def sequences_per_epoch(self) -> list[int]:
        """Sequences in one epoch of each source: all of its usable sequences (the global stream has no remainder)."""
        return [s.total for s in self.sources]

    @property
    def epochs(self) -> list[float]:
        """Epochs of each source consumed by the completed global batches."""
        return [c / s.total for c, s in zip(self._consumed, self.sources)]

    def check_compatible(self, vocab_size: int, seq_len: int, tokenizer: str | None = None) -> None:
        """Refuse a recipe whose vocabulary (model.num_tokens), sequence length or tokenizer (data.tokenizer, if
        given) differs from the manifests'."""
        for m in self.manifests:
            m.check_compatible(vocab_size, seq_len, tokenizer)

    def step_sequences(self) -> np.ndarray:
        """(source, sequence index in the source's usable shards) of every row of the next step's global batch."""
        choices, positions, _ = _plan(self.weights, self._consumed, self.global_batch)
        seqs = np.empty_like(positions)
        for d in np.unique(choices):
            rows = np.flatnonzero(choices == d)
            seqs[rows] = self.sources[d].sequences(positions[rows])
        return np.stack([choices, seqs], axis=1)

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
                "sources": [{"manifest": c.manifest.location, "fingerprint": c.fingerprint, "weight": float(w),
                             "skipped": [location for location, _ in c.skipped]}
                            for c, w in zip(self.checked, self.weights)]}

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
                             f"{STATE_VERSION} (one global shuffle of blocks of sequences, read by byte range; "
                             "version 2 shuffled shards, version 1 had per-rank blocks): it cannot be continued "
                             "exactly, start the data stream afresh")
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
            _check_same_source(old, new)
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


def _check_same_source(old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to resume a source whose data changed since its state was saved (ManifestError: bad input, exit 2),
    naming the manifest and the way forward."""
    where = f"cannot resume on {new['manifest']}"
    stream = "so resuming would not continue the same data stream"
    if old["fingerprint"] != new["fingerprint"]:
        raise ManifestError(
            f"{where}: the dataset changed since the checkpoint was saved (manifest fingerprint "
            f"{old['fingerprint'][:12]} -> {new['fingerprint'][:12]}: it was prepared again, e.g. by prepare_data "
            f"--overwrite), {stream}: restore the dataset the run was trained on, or start a new checkpoint.dir to "
            "train on this one (to keep the weights: tools/convert_checkpoint.py consolidate, then shard --recipe)")
    if old["weight"] != new["weight"]:
        raise ManifestError(f"{where}: its blend weight changed since the checkpoint was saved ({old['weight']!r} -> "
                            f"{new['weight']!r}), {stream}: set data.weights back, or start a new checkpoint.dir")
    if old["skipped"] != new["skipped"]:
        gone = [s for s in new["skipped"] if s not in old["skipped"]]
        back = [s for s in old["skipped"] if s not in new["skipped"]]
        todo = " and ".join(part for part in (f"restore {gone}" if gone else "",
                                              f"move {back} away again" if back else "") if part)
        raise ManifestError(f"{where}: data.skip_corrupt leaves out other shards than when the checkpoint was saved, "
                            f"{stream}: {todo} (the same shards must be left out), or start a new checkpoint.dir")


class EvalBatch(NamedTuple):
    """An evaluation batch: tokens (micro_batch, seq_len), which rows are real (the rest is EOS padding),
    its global index (rank r's g-th batch is g * dp_size + r: the same rows under any DP size) and, for
    conditional data, the prompt positions (`prompts.split_prompts`; None: every position is scored)."""

    tokens: torch.Tensor
    valid: torch.Tensor
    index: int
    given: torch.Tensor | None = None


@dataclass
class EvalLoader:
    """One ordered pass over a split, partitioned over DP ranks; every rank yields the same number of batches.

    Global batch g holds sequences [g*dp*mb, (g+1)*dp*mb) and rank r its r-th slice of mb, so each
    sequence is evaluated exactly once; past the end, rows are EOS with valid=False. A rank reads
    only its slices' bytes. `checked`: `check_split(manifest, split)` as rank 0 computed it (None:
    check here).
    """

    manifest: str
    split: str
    micro_batch: int
    dp_rank: int = 0
    dp_size: int = 1
    verify_crc: bool = True
    cache_dir: str | None = None
    checked: CheckedSplit | None = field(default=None, repr=False)

    def __post_init__(self):
        if not 0 <= self.dp_rank < self.dp_size or self.micro_batch < 1:
            raise ValueError(f"need 0 <= dp_rank < dp_size and micro_batch >= 1, got {self.dp_rank}, "
                             f"{self.dp_size}, {self.micro_batch}")
        if self.checked is None:
            self.checked = check_split(self.manifest, self.split, evaluation=True)
        elif (self.checked.manifest.location, self.checked.split) != (str(self.manifest), self.split):
            raise ValueError(f"checked split {self.checked.split!r} of {self.checked.manifest.location} is not "
                             f"split {self.split!r} of {self.manifest}")
        if self.checked.skipped:
            raise ValueError(f"an evaluation split must be whole; shards were left out: {self.checked.skipped}")
        cache = shard_cache(self.cache_dir)
        if any(is_url(r.tar) for r in self.checked.shards):
            cache.check_writable()
        self._source = _Source(self.checked, 0, 0, rows_reader(self.checked, verify=self.verify_crc, cache=cache))

    def check_compatible(self, vocab_size: int, seq_len: int, tokenizer: str | None = None) -> None:
        """Refuse a recipe whose vocabulary, sequence length or tokenizer (if given) differs from the manifest's."""
        self.checked.manifest.check_compatible(vocab_size, seq_len, tokenizer)

    @property
    def conditional(self) -> bool:
        """Whether the split holds prompt/response rows (each batch then has `given`)."""
        return self.checked.manifest.conditional

    @property
    def num_sequences(self) -> int:
        """Sequences in the split (over all ranks)."""
        return self._source.total

    def __len__(self) -> int:
        """Batches per rank."""
        return -(-self.num_sequences // (self.dp_size * self.micro_batch))

    def __iter__(self) -> Iterator[EvalBatch]:
        """The rank's batches, in order."""
        mb, eos = self.micro_batch, self.checked.manifest.tokenizer.eos_id
        for g in range(len(self)):
            start = (g * self.dp_size + self.dp_rank) * mb
            idx = np.arange(start, start + mb)
            valid = idx < self.num_sequences
            rows = np.full((mb, self._source.seq_len), eos, dtype=np.int64)
            rows[valid] = self._source.read_sequences(idx[valid])
            rows, given = torch.from_numpy(rows), None
            if self.conditional:
                rows[~torch.from_numpy(valid), -1] = 0  # padding rows: no prompt
                rows, given = split_prompts(rows, self.checked.manifest.seq_len)
            yield EvalBatch(rows, torch.from_numpy(valid), g * self.dp_size + self.dp_rank, given)
