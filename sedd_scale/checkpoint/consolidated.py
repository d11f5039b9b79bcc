"""Our consolidated checkpoint: one layout-free directory, written atomically and verified on write.

    <dir>/config.json               format, model config, noise schedule, which weights, provenance
    <dir>/SHA256SUMS                every other file's sha256 (`checksums.py`), checked when opened
    <dir>/tokenizer_config.json     the tokenizer (and tokenizer.json, copied) and README.md, the model card
                                    (`bundle.py`): the directory is all evaluation and sampling need
    <dir>/model.safetensors         whole fp32 tensors by model key (EMA or raw weights, as chosen); above a size,
                                    model-0000i-of-0000N.safetensors + model.safetensors.index.json instead
    <dir>/training/                 optional: everything needed to resume training under any layout
        weights.safetensors         fp32 master weights (raw)
        ema.safetensors             EMA shadow
        exp_avg.safetensors         AdamW first moments
        exp_avg_sq.safetensors      AdamW second moments
        counters.pt                 step, tokens, optimizer step, LR schedule, data position, RNG

Model keys are the parameter names of `SEDD` at TP = 1; the vocabulary is unpadded, so the
directory loads into any TP size (`hub.load_weights`) and converts to the reference's hub format
by renaming keys (`hub.model_to_hub`).
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from sedd_scale.checkpoint import bundle
from sedd_scale.checkpoint.hub import hub_shapes, key_map
from sedd_scale.checkpoint.progress import bar
from sedd_scale.checkpoint.safetensors_shards import DEFAULT_SHARD_BYTES, Weights, WeightsError, write_weights
from sedd_scale.checkpoint.safetensors_writer import save_tensors
from sedd_scale.checkpoint.sharded import staged_dir
from sedd_scale.checksums import ChecksumError, once, verified_text, verify_sums, write_sums
from sedd_scale.config import from_dict, to_dict
from sedd_scale.model.config import ModelConfig

FORMAT = "sedd-scale/consolidated-v1"
CONFIG_FILE, TRAINING_DIR, COUNTERS_FILE = "config.json", "training", "counters.pt"
# The training state's tensors: fp32 master weights, EMA shadow, AdamW's moments.
TRAINING_CATEGORIES = ("weights", "ema", "exp_avg", "exp_avg_sq")


class ConsolidatedError(ValueError):
    """A consolidated checkpoint that is missing, malformed, or does not fit the model asked for."""


@dataclass
class Consolidated:
    """An opened consolidated checkpoint (tensors are read lazily, a key at a time)."""

    path: Path
    config: dict[str, Any]

    @property
    def model(self) -> ModelConfig:
        """The model's config."""
        return from_dict(ModelConfig, dict(self.config["model"]), "model")

    @property
    def noise(self) -> dict[str, Any]:
        """The noise schedule: {"type": "loglinear" | "geometric", plus get_noise's keyword arguments}."""
        return dict(self.config["noise"])

    @property
    def has_training_state(self) -> bool:
        """Whether optimizer moments, EMA and counters are included (resharding needs them)."""
        return (self.path / TRAINING_DIR).is_dir()

    def weights(self) -> Mapping[str, Tensor]:
        """The model weights the checkpoint was written with (EMA or raw, see config["weights"])."""
        try:
            return Weights(self.path)
        except WeightsError as e:
            raise ConsolidatedError(str(e)) from None

    def training_tensors(self) -> dict[str, Mapping[str, Tensor]]:
        """{category: lazy tensors} of the training state."""
        self._need_training()
        return {c: LazyTensors(self.path / TRAINING_DIR / f"{c}.safetensors") for c in TRAINING_CATEGORIES}

    def counters(self) -> dict[str, Any]:
        """The training counters (step, LR schedule, data position, ...)."""
        self._need_training()
        return torch.load(self.path / TRAINING_DIR / COUNTERS_FILE, map_location="cpu", weights_only=False)

    def _need_training(self) -> None:
        if not self.has_training_state:
            raise ConsolidatedError(f"{self.path} holds model weights only: consolidate the training checkpoint "
                                    "again with --training-state to carry optimizer and EMA state")


class LazyTensors(Mapping):
    """A safetensors file as a read-only mapping that loads one tensor per lookup (ranks read only their keys)."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise ConsolidatedError(f"{path} is missing: the consolidated checkpoint is incomplete")
        self.path = path
        try:
            with safe_open(str(path), framework="pt") as f:
                self._keys = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise ConsolidatedError(f"{path} is not a readable safetensors file ({e}): it is truncated or damaged; "
                                    "write the directory again with tools/convert_checkpoint.py") from None

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(f"{key} not in {self.path}")
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def is_consolidated(path: str | Path) -> bool:
    """Whether `path` looks like a consolidated checkpoint (its config.json names our format); the config.json of a
    directory with SHA256SUMS (ours, or a hub directory we wrote) is checked against it before it is parsed."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        return False
    config = _read_config(path, verify=True, required=False)
    return isinstance(config, dict) and config.get("format") == FORMAT


def _read_config(path: Path, *, verify: bool, required: bool = True) -> Any:
    """config.json parsed, after its bytes were checked against SHA256SUMS (`verify`); ConsolidatedError naming the
    file when it is damaged."""
    try:
        text = verified_text(path, CONFIG_FILE, required=required) if verify else (path / CONFIG_FILE).read_text()
        return json.loads(text)
    except ChecksumError as e:
        raise ConsolidatedError(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # only where nothing recorded its bytes
        raise ConsolidatedError(f"{path / CONFIG_FILE} is not valid JSON ({e}): the directory is damaged; write it "
                                "again with tools/convert_checkpoint.py") from None


def open_consolidated(path: str | Path, *, verify: bool = True, collective: bool = False,
                      group=None) -> Consolidated:
    """Open and check a consolidated checkpoint directory (`verify`: every file against SHA256SUMS first).

    `collective`: every rank of `group` (default: all) opens it together, and one of them hashes the files
    (`checksums.once`); otherwise this process hashes them itself, so any one rank may call it alone."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ConsolidatedError(f"{path} is not a consolidated checkpoint (no {CONFIG_FILE})")
    if verify:
        try:
            once(lambda: verify_sums(path), group=group) if collective else verify_sums(path)
        except ChecksumError as e:
            raise ConsolidatedError(str(e)) from None
    config = _read_config(path, verify=False)  # verified above (or by the caller)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ConsolidatedError(f"{config_path}: format {found!r}, expected {FORMAT!r}")
    ckpt = Consolidated(path, config)
    check_tensors(ckpt.model, ckpt.weights(), f"the weights of {path}")
    return ckpt


def check_tensors(cfg: ModelConfig, tensors: Mapping[str, Tensor], where: str) -> None:
    """Refuse tensors whose keys or shapes do not fit `cfg`, listing every problem (of files: from their headers)."""
    expected = expected_shapes(cfg)
    # Files' shapes come from their headers: reading every tensor to look at its shape read the whole weights
    # (27.8 GB for 7B) on every rank that opened the directory.
    shapes = tensors.shapes() if isinstance(tensors, Weights) else {k: tuple(t.shape) for k, t in tensors.items()}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong = [f"{k}: {shapes[k]} (expected {expected[k]})" for k in sorted(set(expected) & set(shapes))
             if shapes[k] != expected[k]]
    problems = [f"{n} ({len(v)}): {v}" for n, v in (("missing", missing), ("unexpected", unexpected),
                                                    ("mis-shaped", wrong)) if v]
    if problems:
        raise ConsolidatedError(f"{where} does not fit model {cfg.name!r} ({cfg.n_blocks} blocks x {cfg.hidden_size}, "
                                f"vocab {cfg.vocab_size}):\n  " + "\n  ".join(problems))


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Whole-tensor shapes by model key (the hub's shapes under our names)."""
    shapes = hub_shapes(cfg)
    return {mkey: shapes[hkey] for hkey, (mkey, _) in key_map(cfg).items()}


def write(path: str | Path, cfg: ModelConfig, noise: dict[str, Any], weights: dict[str, Tensor], *,
          which: str, provenance: dict[str, Any], training: tuple[dict[str, dict[str, Tensor]], dict] | None = None,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: str | None = None,
          bundle_from: Path | None = None) -> Path:
    """Write a consolidated checkpoint atomically, then reread every tensor and compare it bitwise.

    `which` says what `weights` are ("ema" or "raw"); `training` is (tensors by category, counters); weights above
    `max_shard_bytes` are written as shards with an index. The tokenizer `tokenizer` (a spec; or the files of
    `bundle_from`, an export of the same model) and a model card go beside them. An existing `path` is never
    replaced.
    """
    path = Path(path)
    if path.exists():
        raise ConsolidatedError(f"{path} exists: choose a new output directory (nothing is overwritten)")
    check_tensors(cfg, weights, "the weights to write")
    with staged_dir(path) as tmp:
        files = {}
        if training is not None:
            tensors, counters = training
            (tmp / TRAINING_DIR).mkdir()
            files.update({tmp / TRAINING_DIR / f"{c}.safetensors": tensors[c] for c in TRAINING_CATEGORIES})
            torch.save(counters, tmp / TRAINING_DIR / COUNTERS_FILE)
        total = 4 * sum(t.numel() for group in (weights, *files.values()) for t in group.values())  # fp32 bytes
        with bar(total, f"writing {path.name}") as shown:
            write_weights({k: v.float() for k, v in weights.items()}, tmp, max_shard_bytes=max_shard_bytes,
                          written=shown.update)
            for file, tensors in files.items():
                save_tensors({k: v.float() for k, v in tensors.items()}, file, shown.update)
        config = {"format": FORMAT, "model": to_dict(cfg), "noise": noise, "weights": which, **provenance}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if bundle_from is not None:
            bundle.copy_bundle(bundle_from, tmp)
        else:
            record = bundle.write_tokenizer(tmp, tokenizer)
            bundle.write_card(tmp, name=cfg.name, graph=cfg.graph, parameters=sum(t.numel() for t in weights.values()),
                              config=to_dict(cfg), provenance={"weights": which, **provenance}, tokenizer=record)
        write_sums(tmp)
        verify_sums(tmp)
        for file, tensors in [(tmp, weights), *files.items()]:  # verify: what is on disk is what was meant
            reread = Weights(file) if file == tmp else LazyTensors(file)
            bad = [k for k, v in tensors.items() if not torch.equal(reread[k], v.float())]
            if bad or set(reread) != set(tensors):
                raise ConsolidatedError(f"verification of {file} failed: {bad or 'key sets differ'}")
    return path
