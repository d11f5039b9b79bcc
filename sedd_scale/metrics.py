"""Monitoring sinks (tensorboard scalars and texts, a JSONL file, a console progress bar) and FLOP counts."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm import tqdm


def training_flops_per_token(*, matmul_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Model FLOPs per trained token: 6 per matmul weight (fwd + bwd) plus bidirectional attention
    scores and values, 12 * layers * hidden * seq_len (the PaLM appendix B convention)."""
    return 6.0 * matmul_params + 12.0 * num_layers * hidden * seq_len


class Metrics:
    """Rank 0 writes; on other ranks every call is a no-op, so callers need no rank checks."""

    def __init__(self, log_dir: str | Path, *, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.log_dir))
        self.jsonl = open(self.log_dir / "metrics.jsonl", "a")
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
