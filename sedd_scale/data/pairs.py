"""Prompt/response pairs (SFT data) as conditional sequences: one pair per row, EOS-padded, never packed.

Each JSONL line is an object holding a prompt and a response (fields named by `prompt_field` and
`response_field`; an optional `template` such as "Question: {prompt}\\nAnswer: " wraps the prompt). A pair
becomes one row of seq_len tokens: tokens(prompt) + tokens(response) + EOS, then EOS up to seq_len, stored
with its prompt length P after them (`Manifest.conditional`: positions [0, P) are the prompt, held clean).
As in LLaDA's SFT the padding belongs to the response, so the model learns to end its answer; pairs are
padded, not packed several to a row (a row has one prompt). A response that does not fit is cut at seq_len,
with no EOS (the answer goes on), and counted. Bad input is a ValueError naming the file and line and the
fix: a line that is not UTF-8 or not a JSON object, a missing or non-string field, an empty response, a
prompt that leaves no position for the response.

Prompt and response are tokenized separately (no BPE merge crosses their boundary, so P is exact), in
chunks by a process pool whose results are consumed in order (`prepare.ordered_map`): the output bytes do
not depend on the worker count. Without valid pairs of its own, every k-th pair (k = round(1 /
valid_fraction)) is held out. The dataset is built in a temporary sibling and swapped into place like
`prepare.prepare` (nothing written on failure; an old dataset stays whole until the new one is complete).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from sedd_scale.data.corpora import decode_utf8
from sedd_scale.data.manifest import DTYPES, Manifest, SplitInfo, TokenizerInfo
from sedd_scale.data.prepare import PrepareConfig, build_staged, chunks, dtype_for, ordered_map, start_output
from sedd_scale.data.shards import ShardWriter
from sedd_scale.data.tar_layout import default_seqs_per_sample
from sedd_scale.data.tokenizer import Tokenizer, get_tokenizer, is_tokenizer_file

_JSON_TYPES = {dict: "an object", list: "an array", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


@dataclass
class PairsConfig(PrepareConfig):
    """How to read, tokenize and shard prompt/response pairs (`chunk_docs`: pairs per tokenization task)."""

    prompt_field: str = "prompt"
    response_field: str = "response"
    template: str | None = None  # the prompt's text, "{prompt}" standing for the field (None: the field as it is)

    def __post_init__(self):
        super().__post_init__()
        if self.template is not None and "{prompt}" not in self.template:
            raise ValueError(f"--template {self.template!r} has no {{prompt}}: write where the prompt goes, e.g. "
                             "'Question: {prompt}\\nAnswer: '")


@dataclass(frozen=True)
class Pair:
    """One prompt (template applied) and its response; `where` is "FILE:LINE" for errors."""

    where: str
    prompt: str
    response: str


def read_pairs(paths: list[Path], prompt_field: str = "prompt", response_field: str = "response",
               template: str | None = None) -> Iterator[Pair]:
    """The pairs of JSONL files in order (blank lines skipped), each line checked: ValueError naming file and line."""
    for path in paths:
        with open(path, "rb") as f:  # decoded per line, so an error names the line
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                line = decode_utf8(raw, where)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e}): write one JSON object per line") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{where}: {_JSON_TYPES.get(type(obj), type(obj).__name__)}, not a JSON object: "
                                     f"write one object with fields {prompt_field!r} and {response_field!r} per line")
                for name, flag in ((prompt_field, "--prompt-field"), (response_field, "--response-field")):
                    if name not in obj:
                        raise ValueError(f"{where}: no field {name!r} (keys: {sorted(obj)}): name the field with "
                                         f"{flag}")
                    if not isinstance(obj[name], str):
                        raise ValueError(f"{where}: field {name!r} is {_JSON_TYPES.get(type(obj[name]), 'not text')}"
                                         f", not a string: give it as text, or name another field with {flag}")
                prompt, response = obj[prompt_field], obj[response_field]
                if not response.strip():
                    raise ValueError(f"{where}: the response ({response_field!r}) is empty: give every pair a "
                                     "response, or leave the line out")
                yield Pair(where, prompt if template is None else template.replace("{prompt}", prompt), response)


def _token_lists(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each text's tokens followed by EOS (the tokenizer's batch encoding, split per text)."""
    ids, lengths = tok.encode_documents(texts)
    return np.split(ids, np.cumsum(lengths)[:-1])


def encode_pairs(tok: Tokenizer, pairs: list[Pair], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows (n, seq_len + 1) int32: tokens, EOS padding, prompt length; per pair (n, 3) int64: response tokens
    kept (its EOS included), response tokens cut, text bytes). ValueError for a prompt leaving no response room."""
    prompts, responses = _token_lists(tok, [p.prompt for p in pairs]), _token_lists(tok, [p.response for p in pairs])
    rows = np.full((len(pairs), seq_len + 1), tok.eos_id, dtype=np.int32)
    counts = np.zeros((len(pairs), 3), dtype=np.int64)
    for i, (pair, prompt, response) in enumerate(zip(pairs, prompts, responses)):
        n = len(prompt) - 1  # without the EOS encode_documents appends
        if n >= seq_len:
            raise ValueError(f"{pair.where}: the prompt is {n} tokens, which leaves no room for the response in "
                             f"--seq-len {seq_len}: raise --seq-len or shorten the prompt (or leave the line out)")
        kept = min(len(response), seq_len - n)
        rows[i, :n], rows[i, n:n + kept], rows[i, seq_len] = prompt[:n], response[:kept], n
        counts[i] = kept, len(response) - kept, len(pair.prompt.encode("utf-8")) + len(pair.response.encode("utf-8"))
    return rows, counts


def _encode_task(task: tuple[str, str | None, int, list[Pair]]) -> tuple[np.ndarray, np.ndarray]:
    spec, eos_token, seq_len, pairs = task
    return encode_pairs(get_tokenizer(spec, eos_token), pairs, seq_len)


@dataclass
class SplitCounts:
    """What went into one split."""

    pairs: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0  # kept, each response's EOS included
    padding: int = 0  # EOS after the response's own
    truncated: int = 0  # responses cut at seq_len
    cut_tokens: int = 0  # their tokens that did not fit
    text_bytes: int = 0

    def add(self, rows: np.ndarray, counts: np.ndarray, seq_len: int) -> None:
        """Count a block of encoded pairs (`encode_pairs`'s output)."""
        prompt = int(rows[:, seq_len].sum())
        kept = int(counts[:, 0].sum())
        self.pairs += len(rows)
        self.prompt_tokens += prompt
        self.response_tokens += kept
        self.padding += len(rows) * seq_len - prompt - kept
        self.truncated += int((counts[:, 1] > 0).sum())
        self.cut_tokens += int(counts[:, 1].sum())
        self.text_bytes += int(counts[:, 2].sum())

    def describe(self, seq_len: int) -> str:
        """One line: pairs, tokens by kind, truncations."""
        positions = max(1, self.pairs * seq_len)
        return (f"{self.pairs:,} pairs -> {self.pairs:,} sequences of {seq_len}: {self.prompt_tokens:,} prompt + "
                f"{self.response_tokens:,} response tokens (EOS included) + {self.padding:,} EOS padding "
                f"({self.padding / positions:.0%}); responses truncated: {self.truncated:,} "
                f"({self.cut_tokens:,} tokens cut)")


@dataclass
class PairsStats:
    """What `prepare_pairs` did and how fast."""

    manifest: Manifest
    seconds: float
    splits: dict[str, SplitCounts] = field(default_factory=dict)

    def summary(self) -> str:
        """One line of throughput."""
        pairs = sum(c.pairs for c in self.splits.values())
        nbytes = sum(c.text_bytes for c in self.splits.values())
        tokens = sum(c.prompt_tokens + c.response_tokens for c in self.splits.values())
        return (f"{pairs:,} pairs, {nbytes / 1e6:.1f} MB of text -> {tokens:,} tokens in {self.seconds:.2f} s: "
                f"{pairs / self.seconds:,.0f} pairs/s, {nbytes / self.seconds / 1e6:.1f} MB/s")


def prepare_pairs(train: Iterable[Pair], config: PairsConfig, source: dict[str, Any],
                  valid: Iterable[Pair] | None = None) -> PairsStats:
    """Tokenize and shard prompt/response pairs into `config.out` (a conditional manifest); the valid split is
    `valid`, else every k-th train pair (`config.valid_fraction`). Staged and swapped into place."""
    out = config.out
    tokenizer, source = start_output(config, source)
    splits = {"train": train} | ({"valid": valid} if valid is not None else {})
    stats = build_staged(out, lambda stage: _pairs_into(stage, splits, config, source, tokenizer))
    stats.manifest.location = str(out / "manifest.json")
    return stats


def _pairs_into(stage: Path, splits: dict[str, Iterable[Pair]], config: PairsConfig, source: dict[str, Any],
                tokenizer: TokenizerInfo) -> PairsStats:
    seq_len, width = config.seq_len, config.seq_len + 1  # a row ends with its prompt length
    dtype = dtype_for(max(tokenizer.vocab_size, seq_len))
    seqs_per_sample = config.seqs_per_sample or default_seqs_per_sample(width, DTYPES[dtype].itemsize)
    hold_out = "valid" not in splits and config.valid_fraction > 0
    every = round(1 / config.valid_fraction) if hold_out else 0
    names = list(splits) + (["valid"] if hold_out else [])
    seqs_per_shard = max(1, config.shard_tokens // width)
    writers = {s: ShardWriter(stage, s, width, dtype, seqs_per_sample, seqs_per_shard) for s in names}
    counts = {s: SplitCounts() for s in names}
    start = time.perf_counter()
    bar = tqdm(unit=" pair", disable=not config.progress, desc=f"tokenizing pairs ({tokenizer.name})")
    for split, pairs in splits.items():
        tasks = ((config.tokenizer, config.eos_token, seq_len, chunk) for chunk in chunks(pairs, config.chunk_docs))
        first = 0
        for rows, per_pair in ordered_map(_encode_task, tasks, config.workers):
            parts = {split: np.ones(len(rows), dtype=bool)}
            if hold_out and split == "train":
                held = (np.arange(first, first + len(rows)) % every) == every - 1
                parts = {"valid": held, "train": ~held}
            for name, mask in parts.items():
                writers[name].write(rows[mask])
                counts[name].add(rows[mask], per_pair[mask], seq_len)
            first += len(rows)
            bar.update(len(rows))
    bar.close()
    for name in splits:
        if not counts[name].pairs:
            files = source.get("valid_pairs" if name == "valid" else "pairs", "the input")
            raise ValueError(f"{name} split: {files} hold no prompt/response pairs: give JSONL lines with both "
                             "fields")
    out_splits = {s: SplitInfo(counts[s].pairs, counts[s].pairs, counts[s].pairs * seq_len, counts[s].cut_tokens,
                               writers[s].close()) for s in names}
    fields = {"prompt_field": config.prompt_field, "response_field": config.response_field}
    manifest = Manifest(tokenizer, seq_len, dtype, seqs_per_sample, out_splits,
                        {**source, **fields, **({"template": config.template} if config.template else {}),
                         "format": "one prompt/response pair per row: prompt + response + EOS, EOS-padded (not "
                                   "packed); the row's last id is its prompt length",
                         "truncated": "a response that does not fit is cut at seq_len (no EOS); dropped_tokens "
                                      "counts the cut tokens",
                         "valid": (f"every {every}th pair held out" if hold_out else
                                   "the given valid pairs" if "valid" in splits else "none")},
                        conditional=True)
    manifest.save(stage / "manifest.json")
    return PairsStats(manifest, time.perf_counter() - start, counts)
