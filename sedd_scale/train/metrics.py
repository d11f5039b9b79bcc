"""Monitoring sinks (tensorboard scalars, texts and the run's hyperparameters, a JSONL file, a console progress bar,
optionally Weights & Biases: `wandb_sink.py`), the training loss per noise level and the logging interval's averages
(FLOP counts: `sedd_scale.plan.flops`)."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from sedd_scale.config.changes import flatten


class MetricsError(RuntimeError):
    """Writing the run's monitoring files failed (a full disk, a quota, the file-size limit)."""


def describe_write_error(error: OSError, directory: str | Path) -> str:
    """Why a write under `directory` failed and what to do, in words: a full disk (with its free space), an
    exhausted quota, or the file-size limit (EFBIG: ulimit -f, or the filesystem's largest file), which is no
    full disk and needs no space freed."""
    directory = Path(directory)
    if error.errno == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            return (f"a file reached this process's file-size limit (ulimit -f / RLIMIT_FSIZE: {limit} bytes), not a "
                    "full disk: raise the limit (ulimit -f unlimited, or the scheduler's file-size setting)")
        return (f"a file reached the largest size the filesystem of {directory} allows, not a full disk: write the "
                "run to another filesystem")
    existing = directory
    while not existing.exists() and existing != existing.parent:  # the free space of where it would have gone
        existing = existing.parent
    try:
        free = f"{shutil.disk_usage(existing).free / 2**30:.2f} GiB free"
    except OSError as e:  # the description must not hide the error it describes
        free = f"free space unknown: {e.strerror or e}"
    if error.errno == errno.ENOSPC:
        return f"no space left on the filesystem of {directory} ({free}): free space there"
    if error.errno == errno.EDQUOT:
        return f"the disk quota of {directory} is used up ({free} on its filesystem): free space or raise the quota"
    return f"{error.strerror or error} (the filesystem of {directory} has {free})"


class NoiseBandLoss:
    """The training loss per noise level: the mean loss per token of the sequences whose t falls into each of
    `bands` equal bands of [0, 1], summed on the device between logging steps (no host sync per step).

    Bands are found from the total noise sigma(t) the sequences were noised with (the schedule is increasing,
    so t in [k/bands, (k+1)/bands) exactly when sigma lies between the edges' noise levels).
    """

    def __init__(self, total_noise, bands: int = 5, device: torch.device | str = "cpu"):
        self.bands = bands
        self.edges = total_noise(torch.arange(1, bands, dtype=torch.float64) / bands).to(device)
        # loss sums, sequence counts, scored-token counts (of sequences that say how many of their positions count)
        self.sums = torch.zeros(3, bands, dtype=torch.float64, device=device)

    def add(self, total_noise: Tensor, per_sequence: Tensor, scored: Tensor | None = None) -> None:
        """Fold in a micro-batch: each sequence's total noise and loss (nats, summed over its positions), and how many
        positions each scores (None: all seq_len; conditional rows score their response only)."""
        band = torch.bucketize(total_noise.to(self.edges.dtype), self.edges, right=True)
        self.sums[0].index_add_(0, band, per_sequence.detach().to(self.sums.dtype))
        self.sums[1].index_add_(0, band, torch.ones_like(band, dtype=self.sums.dtype))
        if scored is not None:
            self.sums[2].index_add_(0, band, scored.to(self.sums.dtype))

    def take(self, seq_len: int, group=None) -> dict[str, float]:
        """{"train/loss_per_token_t0.0-0.2": mean, ...} over what was added since the last call on any rank of
        `group` (a collective; None: the world when torch.distributed runs), then start over. Bands without
        sequences are left out. The mean is per scored token: per response token for conditional rows."""
        sums = self.sums.clone()
        self.sums.zero_()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums, group=group)
        total, count, scored = sums.tolist()
        out = {}
        for k in range(self.bands):
            if count[k]:
                tokens = scored[k] if scored[k] else count[k] * seq_len
                out[f"train/loss_per_token_t{k / self.bands:.1f}-{(k + 1) / self.bands:.1f}"] = total[k] / tokens
        return out


class IntervalStats:
    """The training steps since the last log line: how many, their summed loss (applied steps only), wall time
    and time waiting for data."""

    def __init__(self):
        self.steps, self.applied, self.loss, self.seconds, self.data_wait = 0, 0, 0.0, 0.0, 0.0

    def add(self, loss: float | None, seconds: float, data_wait: float) -> None:
        """One step; `loss` is None for a skipped one (its value is not finite or not meaningful)."""
        self.steps += 1
        self.seconds += seconds
        self.data_wait += data_wait
        if loss is not None:
            self.applied += 1
            self.loss += loss

    def mean_loss(self) -> float:
        """Mean loss per token over the applied steps (NaN when every step was skipped)."""
        return self.loss / self.applied if self.applied else float("nan")


def _record_step(line: bytes) -> int | None:
    """The step of one JSONL record, or None when the line is not a whole record."""
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    step = record.get("step", 0) if isinstance(record, dict) else None
    return step if isinstance(step, (int, float)) else None


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Drop the records of `path` past `last_step` (atomically); returns how many were dropped.

    A line that is no record (a write cut short by a full disk or the file-size limit) is dropped too, with a
    warning naming the file and the line: the resume goes on instead of failing on it every time.
    """
    if not path.is_file():
        return 0
    lines = path.read_bytes().splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        step = _record_step(line)
        if step is None:
            shown = line[:80].decode("utf-8", "replace").rstrip("\n")
            print(f"warning: {path}, line {number}: dropped an unreadable record (a write cut short, e.g. by a full "
                  f"disk): {shown!r}", file=sys.stderr, flush=True)
        elif step <= last_step:
            kept.append(line if line.endswith(b"\n") else line + b"\n")  # the next record starts on a line of its own
    if kept != lines:
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_bytes(b"".join(kept))
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)  # the original file is untouched
            raise
    return len(lines) - len(kept)


def hparam_values(nested: dict) -> dict[str, int | float | str | bool]:
    """A nested settings mapping as tensorboard hyperparameters: {dotted key: value}, with lists and null written
    as text (tensorboard takes numbers, strings and booleans only)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(nested).items()}


class Metrics:
    """Rank 0 writes; on other ranks every call is a no-op, so callers need no rank checks.

    A failed write (a full disk, the file-size limit) does not raise where it happens: the message is kept in
    `failure` and later writes are skipped, so that rank 0 goes on with the collectives every rank makes until
    the trainer, which checks `failure` every step, stops all ranks together (`take_failure`). Closing a
    Metrics whose failure nobody took raises it.
    """

    def __init__(self, log_dir: str | Path, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 wandb=None):
        """`wandb`: a `WandbSink` that gets the same scalars and texts (rank 0's; None: none)."""
        self.enabled = enabled
        self.wandb = wandb
        self.failure: str | None = None
        self._failure_taken = False
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.jsonl_path = self.log_dir / "metrics.jsonl"
        self.events = f"the tensorboard events in {self.log_dir}"
        self.writer = self.jsonl = None
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)
        self.started = time.time()
        with self._writing(str(self.log_dir)):
            self.log_dir.mkdir(parents=True, exist_ok=True)
        with self._writing(self.events):
            # A run restarting at `start_step` replays the steps after it: tensorboard hides the events from
            # start_step + 1 on (purge_step), and metrics.jsonl keeps only the records up to start_step.
            self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1)
        with self._writing(str(self.jsonl_path)):
            dropped = truncate_jsonl(self.jsonl_path, start_step)
            self.jsonl = open(self.jsonl_path, "a")
            if start_step or dropped:  # mark the restart in the log
                self.jsonl.write(json.dumps({"step": start_step, "event": "resumed" if start_step else "restarted",
                                             "dropped_records": dropped}) + "\n")

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Keep the first failed write of `what` (in log_dir) as `failure`, described (full disk, file-size limit)."""
        try:
            yield
        except OSError as e:
            if self.failure is None:
                self.failure = f"could not write {what}: {describe_write_error(e, self.log_dir)}"

    def take_failure(self) -> str | None:
        """The failed write's message, if any; the caller reports it, so close() no longer raises it."""
        self._failure_taken = True
        return self.failure

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record scalars at `step` (tensorboard + JSONL) and show the main ones on the bar."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        if self.failure is None:
            with self._writing(self.events):
                for key, value in clean.items():
                    if math.isfinite(value):
                        self.writer.add_scalar(key, value, step)
        if self.failure is None:
            with self._writing(str(self.jsonl_path)):
                self.jsonl.write(json.dumps({"step": step, "time": round(time.time() - self.started, 3), **clean})
                                 + "\n")
                self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.scalars(step, clean)
        shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in clean.items() if k in ("train/loss_per_token", "train/lr")}
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def text(self, step: int, tag: str, text: str) -> None:
        """Record a text (e.g. samples) at `step`."""
        if self.enabled and self.failure is None:
            with self._writing(self.events):
                self.writer.add_text(tag, text, step)
        if self.enabled and self.wandb is not None:
            self.wandb.text(step, tag, text)

    def hyperparameters(self, step: int, recipe: dict, layout: dict, lines: list[str]) -> None:
        """Record the run's settings at `step`: the recipe (YAML) and `lines` (layout, parameter counts) as texts,
        and the flattened recipe and layout as tensorboard hyperparameters (its HPARAMS tab, beside the loss and
        the validation ELBO)."""
        if not (self.enabled and self.failure is None):
            return
        import yaml
        from torch.utils.tensorboard.summary import hparams

        self.text(step, "run/recipe", "```yaml\n" + yaml.safe_dump(recipe, sort_keys=False) + "```")
        self.text(step, "run/layout", "\n\n".join(lines))
        values = hparam_values({**recipe, "layout": layout})
        metrics = dict.fromkeys(("train/loss_per_token", "valid/elbo_nats_per_token"), float("nan"))
        with self._writing(self.events):
            for summary in hparams(values, metrics):  # the experiment, session start and end summaries
                self.writer.file_writer.add_summary(summary, step)

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar (its ETA comes from the measured rate)."""
        if self.enabled:
            self.bar.update(steps)

    def message(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if self.enabled:
            self.bar.write(line)

    def flush(self) -> None:
        """Write out what the sinks hold (a failure is kept in `failure`, as for any write)."""
        if self.enabled and self.failure is None:
            with self._writing(self.events):
                self.writer.flush()
            with self._writing(str(self.jsonl_path)):
                self.jsonl.flush()

    def close(self) -> None:
        """Flush and close every sink; raises MetricsError for a failed write nobody took (`take_failure`)."""
        if not self.enabled:
            return
        self.bar.close()
        # After a failure, closing flushes what could not be written and fails the same way: that is the
        # failure already kept, so only the first one is reported.
        if self.writer is not None:
            with self._writing(self.events):
                self.writer.close()
        if self.jsonl is not None:
            with self._writing(str(self.jsonl_path)):
                self.jsonl.close()
        if self.wandb is not None:
            self.wandb.close()
        if self.failure is not None and not self._failure_taken:
            raise MetricsError(self.failure)
