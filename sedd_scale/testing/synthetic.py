"""Random token batches laid out like the training loader's global stream (tests and benchmarks).

Each step's global batch is drawn from (seed, step) and a rank's micro-batches hold its rows of it
(`sedd_scale.layout.row_offset`), so every layout trains on the same rows; the state is the position
in that stream, the same on every rank and layout at a step boundary. With `prompts`, rows are
conditional (prompt/response) rows like a conditional manifest's: seq_len tokens, then a prompt length
in [0, seq_len) drawn after the tokens (the tokens are those of the same stream without prompts).
"""
from __future__ import annotations

import torch


class SyntheticTokens:
    """Each step's global batch drawn from (seed, step); a rank's micro-batches hold its rows of it
    (the row convention of `sedd_scale.layout.row_offset`), so every layout trains on the same rows."""

    def __init__(self, num_tokens: int, seq_len: int, layout, dp_rank: int, seed: int = 0, prompts: bool = False):
        self.num_tokens, self.seq_len, self.layout, self.dp_rank, self.seed = num_tokens, seq_len, layout, dp_rank, seed
        self.conditional = prompts  # as TokenLoader.conditional: rows end with their prompt length
        self.count = 0

    def __iter__(self):
        """This rank's micro-batches, forever."""
        lay = self.layout
        while True:
            step, micro = divmod(self.count, lay.grad_accum)
            gen = torch.Generator().manual_seed(self.seed * 100_003 + step)
            full = torch.randint(0, self.num_tokens, (lay.global_batch, self.seq_len), generator=gen)
            if self.conditional:
                lengths = torch.randint(0, self.seq_len, (lay.global_batch, 1), generator=gen)
                full = torch.cat([full, lengths], dim=1)
            start = lay.row_offset(micro, self.dp_rank)
            self.count += 1
            yield full[start:start + lay.micro_batch]

    def state_dict(self) -> dict:
        """The position in the global stream (the same on every rank and layout at a step boundary)."""
        step, micro = divmod(self.count, self.layout.grad_accum)
        return {"step": step, "micro": micro}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s position."""
        self.count = state["step"] * self.layout.grad_accum + state["micro"]
