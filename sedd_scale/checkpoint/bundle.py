"""What makes an exported model directory self-contained beside its weights: the tokenizer and a model card.

    <dir>/tokenizer_config.json   {"tokenizer": "gpt2" | "byte" | "tokenizer.json", "vocab_size", "sha256",
                                   "eos_token" (a tokenizer.json's end-of-document token)}
    <dir>/tokenizer.json          the Hugging Face tokenizer the model was trained with, copied byte for byte
    <dir>/README.md               the model card: what the model is, how it was trained, its last validation ELBO

All are written before the directory's SHA256SUMS, so they are checked like the weights. A directory without
tokenizer_config.json (the reference's own hub format) gets its tokenizer from its vocabulary size
(`tokenizer_for`: 50257 tokens are GPT-2's, 257 bytes).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from sedd_scale.data.tokenizer import TOKENIZERS, Tokenizer, get_tokenizer, is_tokenizer_file

TOKENIZER_CONFIG, TOKENIZER_FILE, CARD_FILE = "tokenizer_config.json", "tokenizer.json", "README.md"
TOKENIZER_BY_VOCAB = {TOKENIZERS[name].vocab_size: name for name in TOKENIZERS}


class BundleError(ValueError):
    """A tokenizer that cannot be bundled or read back; the message names the fix."""


def write_tokenizer(folder: str | Path, spec: str | None, eos_token: str | None = None) -> dict[str, Any] | None:
    """Record (and for a tokenizer.json, copy) the tokenizer `spec` into `folder`; its record, or None for no spec."""
    if spec is None:
        return None
    folder = Path(folder)
    if spec in TOKENIZERS:  # built in: named, not built (GPT-2's rank file may need fetching)
        record = {"tokenizer": spec, "vocab_size": TOKENIZERS[spec].vocab_size, "sha256": TOKENIZERS[spec].sha256}
    elif is_tokenizer_file(spec):
        if not Path(spec).is_file():
            raise BundleError(f"the model's tokenizer {spec} does not exist (a recipe's relative path is read from "
                              "the directory the command runs in): run from the training directory, or give the "
                              "tokenizer.json's path")
        tok = get_tokenizer(spec, eos_token)
        shutil.copyfile(spec, folder / TOKENIZER_FILE)
        record = {"tokenizer": TOKENIZER_FILE, "vocab_size": tok.vocab_size, "sha256": tok.sha256,
                  "eos_token": tok.eos_token}
    else:
        raise BundleError(f"unknown tokenizer {spec!r}: gpt2, byte or the path of a tokenizer.json")
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
    return record


def copy_bundle(source: str | Path, folder: str | Path) -> None:
    """Copy `source`'s tokenizer files and model card into `folder` (an export of the same model in another format)."""
    for name in (TOKENIZER_CONFIG, TOKENIZER_FILE, CARD_FILE):
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(folder) / name)


def read_tokenizer_record(folder: str | Path) -> dict[str, Any] | None:
    """The directory's tokenizer record (checked by the caller against SHA256SUMS), or None when it has none."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}): export the model again") from None
    if not isinstance(record, dict) or "tokenizer" not in record or "vocab_size" not in record:
        raise BundleError(f"{path} lacks 'tokenizer' and 'vocab_size': export the model again")
    return record


def tokenizer_spec(folder: str | Path) -> str | None:
    """The bundled tokenizer as a spec `get_tokenizer` and recipes take (a built-in's name, or the absolute path of
    the copied tokenizer.json), or None when the directory has none."""
    record = read_tokenizer_record(folder)
    if record is None:
        return None
    if record["tokenizer"] in TOKENIZERS:
        return record["tokenizer"]
    return str((Path(folder) / TOKENIZER_FILE).resolve())


def tokenizer_for(folder: str | Path, num_tokens: int) -> Tokenizer | None:
    """The tokenizer of a model directory: its bundled one, else the one its vocabulary implies (None if none)."""
    folder = Path(folder)
    record = read_tokenizer_record(folder)
    if record is None:
        name = TOKENIZER_BY_VOCAB.get(num_tokens)
        return None if name is None else get_tokenizer(name)
    if record["vocab_size"] != num_tokens:
        raise BundleError(f"{folder / TOKENIZER_CONFIG} names a tokenizer of {record['vocab_size']} tokens for a "
                          f"model of {num_tokens}: the directory mixes two models; export it again")
    if record["tokenizer"] in TOKENIZERS:
        return get_tokenizer(record["tokenizer"])
    if record["tokenizer"] != TOKENIZER_FILE or not (folder / TOKENIZER_FILE).is_file():
        raise BundleError(f"{folder / TOKENIZER_CONFIG} names {record['tokenizer']!r}, which is not in the directory: "
                          "export the model again")
    tok = get_tokenizer(tokenizer_spec(folder), record.get("eos_token"))
    if tok.sha256 != record["sha256"]:
        raise BundleError(f"{folder / TOKENIZER_FILE} is not the tokenizer the model was trained with (sha256 "
                          f"{tok.sha256[:16]}..., recorded {str(record['sha256'])[:16]}...): export the model again")
    return tok


def write_card(folder: str | Path, *, name: str, graph: str, parameters: int, config: dict[str, Any],
               provenance: dict[str, Any], tokenizer: dict[str, Any] | None) -> None:
    """The model card (README.md): the model, its training (steps, tokens, layout, recipe) and its last ELBO."""
    lines = [f"# {name}", "",
             f"A Score Entropy Discrete Diffusion (SEDD) language model trained with sedd-scale: {graph} graph, "
             f"{parameters:,} parameters, {config.get('n_blocks')} blocks x {config.get('hidden_size')} hidden, "
             f"{config.get('n_heads')} heads, sequence length {config.get('length')}, "
             f"{config.get('num_tokens')} tokens "
             f"(tokenizer: {tokenizer['tokenizer'] if tokenizer else 'not recorded'}).", ""]
    if config.get("parametrization") == "denoiser":
        lines += ["Its output is denoiser logits (trained with masked cross-entropy, `diffusion.objective: "
                  "masked_ce`), turned into ratios as log_softmax - log(e^sigma - 1) by sedd-scale's loaders "
                  "(`model.parametrization: denoiser` in config.json). The reference SEDD code reads every output as "
                  "log-ratios and would misread this model.", ""]
    if "step" in provenance:
        lines += ["## Training", "",
                  f"- optimizer steps: {provenance['step']:,}",
                  f"- tokens seen: {provenance.get('tokens_seen', 0):,}",
                  f"- layout: {provenance.get('layout')}",
                  f"- weights: {provenance.get('weights', 'ema')}"]
        last = provenance.get("last_validation")
        if last:
            lines.append(f"- last validation ELBO (step {last['step']}): {last['elbo_nats_per_token']:.4f} "
                         f"+- {last['elbo_stderr']:.4f} nats per token (Monte-Carlo standard error), perplexity "
                         f"<= {last['perplexity_bound']:.3f}")
        else:
            lines.append("- last validation ELBO: none recorded in the run's metrics.jsonl")
        if provenance.get("recipe"):
            lines += ["", "### Recipe", "", "```yaml", yaml.safe_dump(provenance["recipe"], sort_keys=False).rstrip(),
                      "```"]
    else:
        lines += ["## Origin", "", f"Converted from {provenance.get('source', 'an unrecorded source')}."]
    lines += ["", "## Use", "", "```bash", "python tools/sample.py THIS_DIR --num-samples 4 --steps 128",
              "python tools/evaluate.py THIS_DIR --datasets ptb", "```", "",
              "```python", "from sedd_scale.apps.api import load_model",
              'model = load_model("THIS_DIR")', 'texts = model.generate(num_samples=2, steps=128, seed=0)', "```", ""]
    (Path(folder) / CARD_FILE).write_text("\n".join(lines))
