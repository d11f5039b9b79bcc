"""Monitoring sinks (tensorboard scalars and texts, a JSONL file, a console progress bar), the training loss per
noise level and the logging interval's averages (FLOP counts: `sedd_scale.plan.flops`)."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm



class NoiseBandLoss:
    """The training loss per noise level: the mean loss per token of the sequences whose t falls into each of
    `bands` equal bands of [0, 1], summed on the device between logging steps (no host sync per step).

    Bands are found from the total noise sigma(t) the sequences were noised with (the schedule is increasing,
    so t in [k/bands, (k+1)/bands) exactly when sigma lies between the edges' noise levels).
    """

    def __init__(self, total_noise, bands: int = 5, device: torch.device | str = "cpu"):
        self.bands = bands
        self.edges = total_noise(torch.arange(1, bands, dtype=torch.float64) / bands).to(device)
        self.sums = torch.zeros(2, bands, dtype=torch.float64, device=device)  # loss sums, sequence counts

    def add(self, total_noise: Tensor, per_sequence: Tensor) -> None:
        """Fold in a micro-batch: each sequence's total noise and loss (nats, summed over its positions)."""
        band = torch.bucketize(total_noise.to(self.edges.dtype), self.edges, right=True)
        self.sums[0].index_add_(0, band, per_sequence.detach().to(self.sums.dtype))
        self.sums[1].index_add_(0, band, torch.ones_like(band, dtype=self.sums.dtype))

    def take(self, seq_len: int, group=None) -> dict[str, float]:
        """{"train/loss_per_token_t0.0-0.2": mean, ...} over what was added since the last call on any rank of
        `group` (a collective; None: the world when torch.distributed runs), then start over. Bands without
        sequences are left out."""
        sums = self.sums.clone()
        self.sums.zero_()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums, group=group)
        total, count = sums.tolist()
        out = {}
        for k in range(self.bands):
            if count[k]:
                out[f"train/loss_per_token_t{k / self.bands:.1f}-{(k + 1) / self.bands:.1f}"] = \
                    total[k] / count[k] / seq_len
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


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Drop the records of `path` past `last_step` (atomically); returns how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


class Metrics:
    """Rank 0 writes; on other ranks every call is a no-op, so callers need no rank checks."""

    def __init__(self, log_dir: str | Path, *, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # A run restarting at `start_step` replays the steps after it: tensorboard hides the events from
        # start_step + 1 on (purge_step), and metrics.jsonl keeps only the records up to start_step.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1)
        dropped = truncate_jsonl(self.log_dir / "metrics.jsonl", start_step)
        self.jsonl = open(self.log_dir / "metrics.jsonl", "a")
        if start_step or dropped:  # mark the restart in the log
            self.jsonl.write(json.dumps({"step": start_step, "event": "resumed" if start_step else "restarted",
                                         "dropped_records": dropped}) + "\n")
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)
        self.started = time.time()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record scalars at `step` (tensorboard + JSONL) and show the main ones on the bar."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        for key, value in clean.items():
            if math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time() - self.started, 3), **clean}) + "\n")
        self.jsonl.flush()
        shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in clean.items() if k in ("train/loss_per_token", "train/lr")}
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def text(self, step: int, tag: str, text: str) -> None:
        """Record a text (e.g. samples) at `step`."""
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar (its ETA comes from the measured rate)."""
        if self.enabled:
            self.bar.update(steps)

    def message(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if self.enabled:
            self.bar.write(line)

    def close(self) -> None:
        """Flush and close every sink."""
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()
