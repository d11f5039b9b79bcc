"""The Python API: a model directory (hub or consolidated) loaded once, then `generate` and `score`.

    from sedd_scale.apps.api import load_model

    model = load_model("runs/cpu-tiny-ema")                       # TP 1, on this rank's GPU or the CPU
    texts = model.generate(num_samples=4, steps=128, seed=0)     # unconditional
    texts = model.generate(prefix="The ", length=64, sampler="confidence:threshold=0.9")
    texts = model.generate(template="The [BLANK:6] and the [BLANK:6].", steps=64)
    scores = model.score(["one text", "another"], draws=16, seed=0)
    scores[0].nats, scores[0].stderr, scores[0].nats_per_token  # ELBO (an upper bound on -log p) +- MC error

The same pieces as `tools/sample.py` (`generation.py`) and `tools/evaluate.py` (`diffusion.elbo`): samples depend on
the seed, the sampler, its steps and the batch size (batch b draws from (seed, b)), as sample.py's do; a text's score
on the seed, the draws and its index only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sedd_scale.apps.generation import (
    GenerationError,
    batch_plan,
    batch_seed,
    build_conditioning,
    generate_batches,
    model_log_score_fn,
)
from sedd_scale.checkpoint.bundle import tokenizer_for
from sedd_scale.data.tokenizer import Tokenizer
from sedd_scale.diffusion.elbo import elbo_per_sequence
from sedd_scale.diffusion.samplers import parse_sampler


@dataclass(frozen=True)
class Score:
    """One text's ELBO: `nats` bounds -log p(text) from above; `stderr` is its Monte-Carlo standard error."""

    text: str | None
    tokens: int
    nats: float
    stderr: float

    @property
    def nats_per_token(self) -> float:
        """The bound per token."""
        return self.nats / self.tokens

    @property
    def perplexity_bound(self) -> float:
        """exp(nats per token): an upper bound on the text's perplexity under the model."""
        return math.exp(self.nats_per_token)


class SEDDModel:
    """A loaded model with its tokenizer, graph and noise schedule (use `load_model`)."""

    def __init__(self, path: str | Path, device: torch.device | str | None = None):
        from sedd_scale.pretrained import load_pretrained

        self.path = Path(path)
        self.model, self.graph, self.noise = load_pretrained(self.path, tp_size=1, device=device)
        self.config = self.model.config
        self.device = next(self.model.parameters()).device
        self.tokenizer: Tokenizer | None = tokenizer_for(self.path, self.config.num_tokens)
        self._log_score = model_log_score_fn(self.model)

    def _decode(self, ids: Tensor) -> list[str] | Tensor:
        return ids if self.tokenizer is None else [self.tokenizer.decode(row.tolist()) for row in ids]

    def encode(self, text: str) -> list[int]:
        """The token ids of `text` under the model's tokenizer."""
        if self.tokenizer is None:
            raise GenerationError(f"{self.path} has no tokenizer (tokenizer_config.json) and its vocabulary of "
                                  f"{self.config.num_tokens} implies none: pass token ids instead of text")
        return self.tokenizer.encode(text)

    @torch.no_grad()
    def generate(self, num_samples: int = 1, *, steps: int = 128, sampler: str = "analytic", length: int | None = None,
                 prefix: str | None = None, suffix: str | None = None, template: str | None = None,
                 blank_len: int = 8, batch_size: int | None = None, seed: int = 0) -> list[str] | Tensor:
        """`num_samples` texts (token ids when the model has no tokenizer), conditioned on a prefix and/or suffix or
        an infilling template (`[BLANK]`, `[BLANK:N]`); `sampler` is a spec such as "analytic", "cached" or
        "block:size=16,inner=confidence" (`sedd_scale.diffusion.samplers`)."""
        cond = build_conditioning(self.tokenizer, model_length=self.config.length, length=length, prefix=prefix,
                                  suffix=suffix, template=template, blank_len=blank_len)
        plan = batch_plan(num_samples, batch_size or num_samples)
        out = generate_batches(self._log_score, self.graph, self.noise, plan=plan, length=cond.length, steps=steps,
                               seed=seed, infill=cond.infill, device=self.device, sampler=parse_sampler(sampler))
        return self._decode(torch.cat([out[b] for b in range(len(plan))]))

    @torch.no_grad()
    def score(self, texts: list[str] | list[list[int]], *, draws: int = 16, seed: int = 0,
              batch_size: int = 8) -> list[Score]:
        """The ELBO of each text (or list of token ids) with its Monte-Carlo error, from `draws` noise levels.

        Each text is scored at its own length, at most the model's training length; text i draws its noise from a
        generator seeded by (seed, i), so a score does not depend on the batch it was computed in.
        """
        ids = [list(t) if not isinstance(t, str) else self.encode(t) for t in texts]
        too_long = [i for i, t in enumerate(ids) if not 0 < len(t) <= self.config.length]
        if too_long:
            i = too_long[0]
            raise GenerationError(f"text {i} is {len(ids[i])} tokens: score texts of 1 to {self.config.length} tokens "
                                  "(the model's training length); split longer ones")
        scores: list[Score | None] = [None] * len(ids)
        by_length: dict[int, list[int]] = {}
        for i, t in enumerate(ids):
            by_length.setdefault(len(t), []).append(i)
        for rows in by_length.values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                x0 = torch.tensor([ids[i] for i in chunk], dtype=torch.long, device=self.device)
                # one generator per text: a text's draws, and so its score, do not depend on its batch
                gens = [torch.Generator(device=self.device).manual_seed(batch_seed(seed, i)) for i in chunk]
                bound, var = elbo_per_sequence(self._log_score, self.graph, self.noise, x0, num_samples=draws,
                                               generator=gens)
                for row, i in enumerate(chunk):
                    scores[i] = Score(texts[i] if isinstance(texts[i], str) else None, len(ids[i]),
                                      float(bound[row]), float(var[row]) ** 0.5)
        return scores


def load_model(path: str | Path, device: torch.device | str | None = None) -> SEDDModel:
    """Load a hub or consolidated model directory on `device` (default: this rank's GPU, else the CPU)."""
    return SEDDModel(path, device)
