"""Writing a training checkpoint while training goes on, and committing it once every rank is done.

A save is snapshotted to host memory by the trainer (the stall), then `Saver.start` writes it: in a
background thread (periodic saves) or at once (pre-emption, the end of a run). Every rank's thread
ends by listing its files with sizes and sha256. The trainer learns when all ranks are done from the
small all-reduce it makes every step anyway (`busy`, `failed` ride along with its stop flag) and
calls `finish` on every rank at that same step: rank 0 commits (`CheckpointDir.commit`), the outcome
is broadcast, and a failure anywhere is raised on every rank, never lost. `wait` does the same at once
(the next save, the end of a run). Old steps are pruned by rank 0 in a thread of its own.
"""
from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sedd_scale.checkpoint.files import write_files
from sedd_scale.checkpoint.sharded import FILES_DIR, CheckpointDir, CheckpointError, atomic_write_text, step_name


@dataclass
class _Pending:
    step: int
    staging: Path
    meta: dict
    started: float
    thread: threading.Thread | None = None
    error: BaseException | None = None
    bytes: int = 0
    write_seconds: float = 0.0


class Saver:
    """One rank's side of the save protocol over `directory` (`world_size` ranks, this one `rank`)."""

    def __init__(self, directory: CheckpointDir, *, rank: int, world_size: int, run_id: str, device):
        self.dir, self.rank, self.world_size, self.run_id, self.device = directory, rank, world_size, run_id, device
        self.pending: _Pending | None = None
        self.last: dict[str, Any] | None = None  # the last committed save: step, path, bytes, seconds
        self._pruner: threading.Thread | None = None

    def staging(self, step: int) -> Path:
        """Where the files of `step` are written before the commit."""
        return self.dir.staging(step, self.run_id)

    def start(self, step: int, files: list[tuple[Path, Any]], meta: dict, *, background: bool) -> None:
        """Write this rank's `files` (host snapshots, paths under `staging(step)`) now or in a thread."""
        if self.pending is not None:
            raise RuntimeError("a checkpoint is still being written: call wait() before starting another")
        pending = self.pending = _Pending(step, self.staging(step), meta, time.perf_counter())

        def write() -> None:
            started = time.perf_counter()
            try:
                records = write_files(pending.staging, files)
                listing = pending.staging / FILES_DIR / f"rank_{self.rank:05d}.json"
                listing.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(listing, json.dumps(records))
                pending.bytes = sum(r["bytes"] for r in records.values())
            except BaseException as e:  # kept and raised by finish() on the main thread, with every rank
                pending.error = e
            pending.write_seconds = time.perf_counter() - started

        if background:
            pending.thread = threading.Thread(target=write, name=f"checkpoint-{step_name(step)}", daemon=True)
            pending.thread.start()
        else:
            write()

    def busy(self) -> bool:
        """Whether this rank is still writing."""
        return self.pending is not None and self.pending.thread is not None and self.pending.thread.is_alive()

    def failed(self) -> bool:
        """Whether this rank's write failed (meaningful once it is no longer busy)."""
        return self.pending is not None and self.pending.error is not None

    def status(self) -> list[float]:
        """[busy, failed] for the trainer's per-step all-reduce (MAX over ranks)."""
        return [float(self.busy()), float(self.failed())]

    def finish(self, any_failed: bool) -> Path:
        """Every rank, at the same step, once no rank is busy: commit on rank 0, or raise everywhere."""
        pending, self.pending = self.pending, None
        if pending is None:
            raise RuntimeError("finish() without a checkpoint being written")
        if pending.thread is not None:
            pending.thread.join()
        if any_failed:
            if self.rank == 0:
                shutil.rmtree(pending.staging, ignore_errors=True)  # best effort; a new trainer removes leftovers
            if pending.error is not None:
                raise pending.error
            raise CheckpointError(f"checkpoint of step {pending.step} failed on another rank (its log says why); "
                                  f"nothing was committed and {self.dir.root / 'latest'} still names the previous "
                                  "checkpoint")
        error: BaseException | None = None
        if self.rank == 0:
            self._join_pruner()
            try:
                self.dir.commit(pending.staging, pending.step, pending.meta, self.world_size)
            except (CheckpointError, OSError) as e:
                error = e
        flag = torch.tensor([float(error is not None)], device=self.device)
        dist.broadcast(flag, src=0)  # every rank learns the commit's outcome at this same step
        if error is not None:
            raise error
        if bool(flag):
            raise CheckpointError(f"rank 0 could not commit checkpoint step {pending.step} (its log says why); "
                                  "the previous checkpoint stays latest")
        final = self.dir.root / step_name(pending.step)
        self.last = {"step": pending.step, "path": final, "bytes": pending.bytes,
                     "seconds": time.perf_counter() - pending.started, "write_seconds": pending.write_seconds}
        if self.rank == 0:
            self._pruner = threading.Thread(target=self._prune, name="checkpoint-prune", daemon=True)
            self._pruner.start()
        return final

    def wait(self) -> Path | None:
        """Finish the save being written now (a collective over every rank); None when there is none."""
        pending = torch.tensor([float(self.pending is not None)], device=self.device)
        dist.all_reduce(pending, op=dist.ReduceOp.MAX)
        if not bool(pending):
            return None
        if self.pending is None:
            raise RuntimeError(f"rank {self.rank} has no checkpoint in flight while other ranks do")
        if self.pending.thread is not None:
            self.pending.thread.join()
        failed = torch.tensor([float(self.failed())], device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        return self.finish(bool(failed))

    def _prune(self) -> None:
        try:
            self.dir.prune()
        except OSError as e:  # never fatal: pruned folders are outside the protocol; say so and go on
            print(f"warning: could not delete old checkpoints under {self.dir.root}: {e}", file=sys.stderr, flush=True)

    def _join_pruner(self) -> None:
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    def close(self) -> None:
        """Wait for rank 0's pruning (before the process exits or the directory is rolled back)."""
        self._join_pruner()
