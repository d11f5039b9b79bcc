"""Sampling a trained SEDD model at any TP x DP layout, text conditioning, and sample metrics.

The pieces `tools/sample.py` is made of, usable on their own:

* `build_conditioning`: a prefix/suffix or a template with blanks -> which positions hold which
  ids (an `Infill` for the sampler). Template syntax: `[BLANK]` is a blank of `blank_len` tokens,
  `[BLANK:N]` one of N tokens; the text between blanks is tokenised piece by piece, exactly as
  written (with GPT-2 BPE a space before a blank is its own token: write "The[BLANK] sat" to let
  the blank start with " cat").
* `generate_batches`: sample batch b (global index) with a generator seeded from (seed, b); DP
  rank r draws the batches b = r mod DP, so the samples do not depend on the DP size. Any registered
  sampler (`sedd_scale.diffusion.samplers`: analytic, euler, cached, confidence, block) draws them.
  `collect_samples` joins them on rank 0 in global order, `collect_nfe` their network evaluations.
* `unigram_entropy`, `CausalLMScorer` / `perplexity_summary`: the diversity metric and the
  generative perplexity under a local Hugging Face causal LM (sedd-math section 6).

Megatron-core is imported only by the functions that need it, so checking inputs stays cheap.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sedd_scale.data.tokenizer import TOKENIZERS, Tokenizer, get_tokenizer, is_tokenizer_file
from sedd_scale.diffusion.samplers import Sampler, build_sampler
from sedd_scale.diffusion.sampling import Infill
from sedd_scale.model.config import ModelConfig

BLANK = re.compile(r"\[BLANK(?::(\d+))?\]")
# Probe text for "does the scorer's tokenizer split text like ours" (words, digits, spaces, non-ASCII).
_PROBE = "Hello world! The quick brown fox, 1234 times.\n\n  Ünïcödé → 東京 <tag> it's"


class GenerationError(ValueError):
    """Input that generation cannot use; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# Model metadata, tokenizer
def read_model_config(path: str | Path, *, verify: bool = True) -> ModelConfig:
    """The model config of a hub or consolidated directory from its config.json (no weights, no megatron-core);
    config.json is checked against SHA256SUMS, and every file of a consolidated one too when `verify` (a caller that
    loads the weights next, which checks them, passes False: hashing them twice, on every rank, is waste)."""
    from sedd_scale.checkpoint import consolidated, hub

    path = Path(path)
    try:
        if consolidated.is_consolidated(path):
            return consolidated.open_consolidated(path, verify=verify).model
        if (path / "meta.json").is_file() or (path / "latest").is_file():
            raise GenerationError(f"{path} is a sharded training checkpoint: consolidate it first (python "
                                  f"tools/convert_checkpoint.py consolidate {path} OUT --weights ema)")
        if not (path / hub.CONFIG_FILE).is_file():
            raise GenerationError(f"{path} holds no config.json: pass a hub or consolidated checkpoint directory "
                                  "(config.json + model.safetensors)")
        return hub.model_config_from_hub(hub.read_hub_config(path))
    except (consolidated.ConsolidatedError, hub.HubFormatError) as e:
        raise GenerationError(f"cannot read {str(path)!r}: {e}") from e


def check_tp(world_size: int, tp: int, n_heads: int | None = None) -> None:
    """Raise GenerationError unless `tp` divides the world size (and the model's heads, when known)."""
    if tp < 1 or world_size % tp:
        raise GenerationError(f"--tp {tp} does not divide the world size {world_size}: launch a multiple of {tp} "
                              f"processes (torchrun --nproc-per-node) or pick a --tp that divides {world_size}")
    if n_heads is not None and n_heads % tp:
        divisors = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
        raise GenerationError(f"--tp {tp} does not divide the model's {n_heads} attention heads: "
                              f"use --tp in {divisors}")


def choose_tokenizer(name: str, num_tokens: int, folder: str | Path | None = None) -> Tokenizer | None:
    """The tokenizer for a model with `num_tokens` real tokens: "auto" is the one bundled in the model directory
    `folder` (else the one its vocabulary implies: 50257 gpt2, 257 byte); "none", "gpt2", "byte" or a tokenizer.json
    path name one."""
    from sedd_scale.checkpoint.bundle import BundleError, tokenizer_for

    if name == "none":
        return None
    if name == "auto":
        try:
            return tokenizer_for(folder, num_tokens) if folder is not None else None
        except (BundleError, ValueError) as e:
            raise GenerationError(f"the model's tokenizer: {e}") from None
    if name not in TOKENIZERS and not is_tokenizer_file(name):
        raise GenerationError(f"unknown tokenizer {name!r}: use auto, none, {', '.join(TOKENIZERS)} or the path of a "
                              "tokenizer.json")
    try:  # a built-in's size is checked before building it (GPT-2's may fetch its rank file)
        size = TOKENIZERS[name].vocab_size if name in TOKENIZERS else get_tokenizer(name).vocab_size
    except ValueError as e:
        raise GenerationError(str(e)) from None
    if size != num_tokens:
        raise GenerationError(f"tokenizer {name} has {size} tokens but the model has {num_tokens}: "
                              "use --tokenizer auto or none")
    return get_tokenizer(name)


# ---------------------------------------------------------------------------------------------
# Conditioning
def parse_template(text: str, blank_len: int) -> list[str | int]:
    """A template as text pieces and blank sizes: "a [BLANK:2] b [BLANK]" -> ["a ", 2, " b ", blank_len]."""
    if blank_len < 1:
        raise GenerationError(f"--blank-len must be >= 1, got {blank_len}")
    pieces: list[str | int] = []
    pos = 0
    for match in BLANK.finditer(text):
        pieces.append(text[pos:match.start()])
        size = blank_len if match.group(1) is None else int(match.group(1))
        if size < 1:
            raise GenerationError(f"blank {match.group(0)!r} in the template has no tokens: use [BLANK:N] with N >= 1")
        pieces.append(size)
        pos = match.end()
    pieces.append(text[pos:])
    bad = [p for p in pieces if isinstance(p, str) and "[BLANK" in p]
    if bad:
        raise GenerationError(f"malformed blank in the template near {bad[0]!r}: write [BLANK] or [BLANK:N]")
    return [p for p in pieces if p != ""]


def _ranges(flags: list[bool]) -> list[list[int]]:
    """Half-open [start, end) runs of True."""
    out: list[list[int]] = []
    for i, flag in enumerate(flags):
        if flag and out and out[-1][1] == i:
            out[-1][1] = i + 1
        elif flag:
            out.append([i, i + 1])
    return out


@dataclass
class Conditioning:
    """The given token at each position of a sample (None where it is generated) and how it was asked for."""

    given: list[int | None]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Sequence length."""
        return len(self.given)

    @property
    def infill(self) -> Infill | None:
        """The sampler's clamp, or None when nothing is given."""
        return Infill.from_template(self.given) if any(t is not None for t in self.given) else None

    def record(self) -> dict[str, Any]:
        """JSON-ready description: the request plus the half-open ranges of given positions."""
        return {**self.info, "given_ranges": _ranges([t is not None for t in self.given])}


def build_conditioning(tokenizer: Tokenizer | None, *, model_length: int, length: int | None = None,
                       prefix: str | None = None, suffix: str | None = None, template: str | None = None,
                       blank_len: int = 8, extrapolate: bool = False) -> Conditioning:
    """Given positions from a prefix/suffix or a template; length: `length`, else the template's, else the model's.

    A length above the model's training length is refused unless `extrapolate` (rotary attention runs
    at any length, but the model never saw one that long: samples may degrade).
    """
    # Positions after a template's end are generated (a --length longer than the template).
    if template is not None and (prefix is not None or suffix is not None):
        raise GenerationError("--template cannot be combined with --prefix/--suffix: put the prefix and suffix "
                              "into the template")
    if length is not None and length < 1:
        raise GenerationError(f"--length must be >= 1, got {length}")
    texts = [t for t in (prefix, suffix, template) if t is not None]
    if texts and tokenizer is None:
        raise GenerationError("text conditioning needs a tokenizer: pass --tokenizer gpt2, byte or a tokenizer.json "
                              "(a model whose vocabulary fits one)")
    if template is not None:
        pieces = parse_template(template, blank_len)
        given: list[int | None] = []
        for piece in pieces:
            given.extend([None] * piece if isinstance(piece, int) else tokenizer.encode(piece))
        size = len(given)
        total = size if length is None else length
        if size > total:
            raise GenerationError(f"the template is {size} tokens but --length is {total}: shorten the template "
                                  f"or its blanks, or pass --length >= {size}")
        given.extend([None] * (total - size))
        info = {"type": "template", "template": template, "blank_len": blank_len, "template_tokens": size}
    elif prefix is not None or suffix is not None:
        total = model_length if length is None else length
        head = tokenizer.encode(prefix) if prefix else []
        tail = tokenizer.encode(suffix) if suffix else []
        if len(head) + len(tail) > total:
            raise GenerationError(f"--prefix ({len(head)} tokens) + --suffix ({len(tail)} tokens) exceed the length "
                                  f"{total}: shorten them or pass a larger --length")
        given = [*head, *[None] * (total - len(head) - len(tail)), *tail]
        info = {"type": "prefix_suffix", "prefix": prefix or "", "suffix": suffix or ""}
    else:
        total = model_length if length is None else length
        given, info = [None] * total, {"type": "unconditional"}
    if all(t is not None for t in given):
        raise GenerationError(f"the conditioning fixes all {len(given)} positions, nothing is left to generate: "
                              "add a blank or raise --length")
    if len(given) > model_length and not extrapolate:
        what = "the template is" if template is not None and length is None else "--length is"
        raise GenerationError(f"{what} {len(given)} tokens, longer than the model's training length {model_length} "
                              f"(model.length): pass --length <= {model_length} (shorten the template or its blanks), "
                              "or --extrapolate to sample longer anyway (the model never saw such lengths)")
    return Conditioning(given, info)


# ---------------------------------------------------------------------------------------------
# Sampling
def batch_plan(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """(first global sample index, size) of each batch; the last one may be smaller."""
    if num_samples < 1 or batch_size < 1:
        raise GenerationError(f"--num-samples and --batch-size must be >= 1, got {num_samples} and {batch_size}")
    return [(start, min(batch_size, num_samples - start)) for start in range(0, num_samples, batch_size)]


def batch_seed(seed: int, batch: int) -> int:
    """The generator seed of global batch `batch` (a SeedSequence of (seed, batch): streams do not overlap)."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, np.uint64)[0])


def model_log_score_fn(model) -> Callable[[Tensor, Tensor], Tensor]:
    """The full-vocabulary log-score function of a (TP-sharded) SEDD: its shards gathered on every TP rank."""
    from sedd_scale.distributed import parallel

    def log_score(x: Tensor, total: Tensor) -> Tensor:
        return parallel.gather_tp(model(x, total.float()))

    return log_score


def generate_batches(log_score_fn, graph, noise, *, plan: list[tuple[int, int]], length: int, steps: int,
                     predictor: Literal["euler", "analytic"] = "analytic", seed: int, dp_rank: int = 0,
                     dp_size: int = 1, infill: Infill | None = None, eps: float = 1e-5, denoise: bool = True,
                     device=None, sampler: Sampler | None = None, nfe: dict[int, float] | None = None,
                     on_batch: Callable[[int, Tensor], None] | None = None) -> dict[int, Tensor]:
    """Sample this DP rank's batches (b = dp_rank mod dp_size); global batch index -> (size, length) CPU ids.

    `sampler` (a registered one, `sedd_scale.diffusion.samplers`) replaces the exact tau-leaping `predictor`;
    `nfe`, when given, receives each batch's network evaluations per sequence.
    """
    if seed < 0:
        raise GenerationError(f"--seed must be >= 0, got {seed}")
    chosen = sampler if sampler is not None else build_sampler(predictor)
    device = torch.device(device if device is not None else "cpu")
    out: dict[int, Tensor] = {}
    for b, (_, size) in enumerate(plan):
        if b % dp_size != dp_rank:
            continue
        gen = torch.Generator(device=device).manual_seed(batch_seed(seed, b))
        drawn = chosen(log_score_fn, graph, noise, (size, length), steps=steps, eps=eps, denoise=denoise,
                       infill=infill, device=device, generator=gen)
        out[b] = drawn.tokens.cpu()
        if nfe is not None:
            nfe[b] = drawn.nfe
        if on_batch is not None:
            on_batch(b, out[b])
    return out


def _gather_on_rank0(payload: dict) -> list[dict] | None:
    """Every rank's dict on rank 0 (None elsewhere); a collective over the default group."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(payload, parts, dst=0)
        return parts if dist.get_rank() == 0 else None
    return [payload]


def collect_samples(local: dict[int, Tensor], num_batches: int, *, contribute: bool = True) -> Tensor | None:
    """All batches in global order on rank 0 (None elsewhere); a collective over the default group."""
    # TP ranks > 0 hold copies of their replica's samples: they pass contribute=False and send nothing.
    parts = _gather_on_rank0(local if contribute else {})
    if parts is None:
        return None
    merged: dict[int, Tensor] = {}
    for part in parts:
        merged.update(part)
    if sorted(merged) != list(range(num_batches)):
        raise RuntimeError(f"rank 0 received batches {sorted(merged)}, expected 0..{num_batches - 1}")
    return torch.cat([merged[b] for b in range(num_batches)])


def collect_nfe(local: dict[int, float], plan: list[tuple[int, int]], *, contribute: bool = True) -> float | None:
    """The network evaluations per sequence over all batches (weighted by batch size) on rank 0; a collective."""
    parts = _gather_on_rank0(local if contribute else {})
    if parts is None:
        return None
    merged = {b: v for part in parts for b, v in part.items()}
    return sum(merged[b] * size for b, (_, size) in enumerate(plan)) / sum(size for _, size in plan)


# ---------------------------------------------------------------------------------------------
# Metrics
def perplexity_summary(nll_sum: Tensor, counts: Tensor) -> dict[str, float]:
    """gen_ppl: mean over samples of exp(mean NLL) (the reference's); gen_ppl_token: exp(sum NLL / sum tokens)."""
    nll_sum, counts = nll_sum.to(torch.float64), counts.to(torch.float64)
    per_sample = torch.exp(nll_sum / counts)
    return {"gen_ppl": float(per_sample.mean()), "gen_ppl_token": float(torch.exp(nll_sum.sum() / counts.sum())),
            "gen_nll_per_token": float(nll_sum.sum() / counts.sum()), "gen_ppl_scored_tokens": int(counts.sum())}


def _has_tokenizer_files(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                     "tokenizer.model"))


def _context_of(config) -> int | None:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class CausalLMScorer:
    """A local Hugging Face causal LM scoring samples: next-token NLL of every position after the first.

    `mode` "ids" scores our token ids directly (same vocabulary, e.g. GPT-2 samples under GPT-2
    large, as the reference does); "text" decodes our ids and re-encodes the text with the scorer's
    tokenizer; "auto" picks "ids" when the scorer's tokenizer splits a probe text like ours (or,
    without tokenizer files, when its vocabulary size equals ours), else "text". Nothing is
    downloaded: HF_HUB_OFFLINE=1 and local_files_only.
    """

    def __init__(self, path: str | Path, *, tokenizer: Tokenizer | None, num_tokens: int,
                 mode: Literal["auto", "ids", "text"] = "auto", device=None, batch_size: int = 8,
                 load_weights: bool = True):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise GenerationError(f"--gen-ppl-model {str(path)!r} is not a local Hugging Face model directory "
                                  "(no config.json): pass the folder written by save_pretrained")
        if mode not in ("auto", "ids", "text"):
            raise GenerationError(f"unknown scoring mode {mode!r}: use auto, ids or text")
        if batch_size < 1:
            raise GenerationError(f"the scoring batch size must be >= 1, got {batch_size}")
        os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/huggingface_hub read it
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.path, self.batch_size = path, batch_size
        self.ours, self.num_tokens = tokenizer, num_tokens
        self.config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = int(getattr(self.config, "vocab_size", 0))
        self.context = _context_of(self.config)
        self.hf_tokenizer = (AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                             if _has_tokenizer_files(path) else None)
        self.mode = self._resolve_mode(mode)
        self.device = torch.device(device if device is not None else "cpu")
        self.model = None
        if load_weights:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()

    def _same_vocabulary(self) -> bool:
        hf, ours = self.hf_tokenizer, self.ours
        return (len(hf) == ours.vocab_size
                and list(hf(_PROBE, add_special_tokens=False)["input_ids"]) == list(ours.encode(_PROBE)))

    def _resolve_mode(self, mode: str) -> str:
        where = f"the scorer {str(self.path)!r}"
        if mode == "auto":
            if self.hf_tokenizer is not None and self.ours is not None:
                mode = "ids" if self._same_vocabulary() else "text"
            elif self.vocab_size == self.num_tokens:
                mode = "ids"  # no tokenizer on one side: equal vocabulary sizes are taken as the same vocabulary
            else:
                raise GenerationError(f"cannot match vocabularies: {where} has {self.vocab_size} tokens and "
                                      f"{'no' if self.hf_tokenizer is None else 'a'} tokenizer, the model "
                                      f"{self.num_tokens} tokens and {'no' if self.ours is None else 'a'} tokenizer; "
                                      "save the scorer's tokenizer with it or use a scorer with our vocabulary")
        if mode == "ids" and self.vocab_size < self.num_tokens:
            raise GenerationError(f"{where} has {self.vocab_size} tokens, fewer than the model's {self.num_tokens}: "
                                  "ids cannot be scored directly; use --gen-ppl-tokens text")
        if mode == "text" and (self.hf_tokenizer is None or self.ours is None):
            raise GenerationError(f"--gen-ppl-tokens text needs tokenizers on both sides ({where}: "
                                  f"{'none' if self.hf_tokenizer is None else 'present'}, model: "
                                  f"{'none' if self.ours is None else self.ours.name})")
        return mode

    def check_length(self, length: int) -> None:
        """Raise GenerationError when samples of `length` cannot be scored (ids mode: longer than the context)."""
        if length < 2:
            raise GenerationError(f"generative perplexity needs samples of >= 2 tokens, got --length {length}")
        if self.mode == "ids" and self.context is not None and length > self.context:
            raise GenerationError(f"samples of {length} tokens exceed the scorer's context of {self.context}: "
                                  f"pass --length <= {self.context} or a scorer with a longer context")

    def _sequences(self, ids: Tensor) -> tuple[list[list[int]], int]:
        if self.mode == "ids":
            return [row.tolist() for row in ids], 0
        seqs = [list(self.hf_tokenizer(self.ours.decode(row.tolist()), add_special_tokens=False)["input_ids"])
                for row in ids]
        limit = self.context or max(len(s) for s in seqs)
        truncated = sum(len(s) > limit for s in seqs)
        return [s[:limit] for s in seqs], truncated

    @torch.no_grad()
    def score(self, ids: Tensor) -> tuple[Tensor, Tensor, dict[str, int]]:
        """Per-sample summed next-token NLL (nats, float64) and scored-token counts, plus notes (truncated, skipped)."""
        if self.model is None:
            raise RuntimeError("this scorer was built with load_weights=False")
        model = self.model.to(self.device)
        seqs, truncated = self._sequences(ids)
        nll = torch.zeros(len(seqs), dtype=torch.float64)
        counts = torch.zeros(len(seqs), dtype=torch.long)
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            width = max(len(s) for s in chunk)
            if width < 2:
                continue
            # Right padding: a causal model's outputs at real positions do not see the padding.
            tokens = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, s in enumerate(chunk):
                tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, :len(s)] = 1
            tokens, mask = tokens.to(self.device), mask.to(self.device)
            logits = model(input_ids=tokens, attention_mask=mask).logits[:, :-1].float()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
            keep = mask[:, 1:].to(torch.float64)
            nll[start:start + len(chunk)] = (ce.view(len(chunk), -1).to(torch.float64) * keep).sum(1).cpu()
            counts[start:start + len(chunk)] = keep.sum(1).long().cpu()
        return nll, counts, {"truncated": truncated, "skipped": int((counts == 0).sum())}


def score_samples(scorer: CausalLMScorer, ids: Tensor) -> tuple[dict[str, Any], list[float | None]]:
    """Summary metrics and per-sample perplexities (None for a sample with no scored token)."""
    nll, counts, notes = scorer.score(ids)
    kept = counts > 0
    if not bool(kept.any()):
        raise RuntimeError("no sample has two tokens under the scorer's tokenizer: nothing to score")
    summary = {**perplexity_summary(nll[kept], counts[kept]), "gen_ppl_mode": scorer.mode,
               "gen_ppl_model": str(scorer.path), "gen_ppl_truncated": notes["truncated"],
               "gen_ppl_skipped": notes["skipped"]}
    per_sample = [math.exp(float(n) / int(c)) if c > 0 else None for n, c in zip(nll, counts)]
    return summary, per_sample


# ---------------------------------------------------------------------------------------------
# Output
def atomic_write(path: str | Path, lines: Iterable[str]) -> None:
    """Write text lines to `path` atomically (readers see the old file or the whole new one)."""
    from sedd_scale.checkpoint.sharded import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(lines))


def sample_records(ids: Tensor, conditioning: Conditioning, tokenizer: Tokenizer | None,
                   entropy: Tensor, gen_ppl: list[float | None] | None = None) -> list[dict[str, Any]]:
    """One JSON-ready dict per sample: index, ids, text (with a tokenizer), conditioning, metrics."""
    cond = conditioning.record()
    out = []
    for i, row in enumerate(ids.tolist()):
        rec: dict[str, Any] = {"index": i, "ids": row}
        if tokenizer is not None:
            rec["text"] = tokenizer.decode(row)
        rec["conditioning"] = cond
        rec["unigram_entropy"] = float(entropy[i])
        if gen_ppl is not None:
            rec["gen_ppl"] = gen_ppl[i]
        out.append(rec)
    return out
