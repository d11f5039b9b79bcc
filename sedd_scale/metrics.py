"""Monitoring sinks (tensorboard scalars and texts, a JSONL file, a console progress bar) and FLOP counts."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from tqdm import tqdm


def training_flops_per_token(*, matmul_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Model FLOPs per trained token: 6 per matmul weight (fwd + bwd) plus bidirectional attention
    scores and values, 12 * layers * hidden * seq_len (the PaLM appendix B convention)."""
    return 6.0 * matmul_params + 12.0 * num_layers * hidden * seq_len


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
