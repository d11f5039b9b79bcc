"""Checkpoint conversions (the library behind tools/convert_checkpoint.py), in one process; each verifies itself.

* consolidate: a training checkpoint (any TP/PP/DP/ZeRO, any world size) -> a consolidated directory
  (EMA or raw weights; optionally the whole training state), read from the checkpoint's files
  directly (`checkpoint.offline`): no process groups, no engines, memory about the state produced.
* reshard: a training checkpoint -> a run directory whose step holds the whole training state
  layout-free (a consolidated directory with training state, `sharded.ANY_LAYOUT`): a run under any
  TP/PP/DP/ZeRO layout resumes it exactly, each rank reading only its slices of it.
* shard: a consolidated directory -> such a run directory (exact with training state; weights only
  start training from them at step 0, e.g. fine-tuning a hub model with --recipe).
* to_hub / from_hub: consolidated <-> the reference's hub format (a renaming).

Outputs are written to a temporary name, reread and compared with what was meant, and only then
renamed into place; an existing output is never touched, missing parent folders are created.
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from sedd_scale.checkpoint import bundle, hub
from sedd_scale.checkpoint import consolidated as cons
from sedd_scale.checkpoint.progress import bar
from sedd_scale.checkpoint.safetensors_shards import DEFAULT_SHARD_BYTES
from sedd_scale.checkpoint.sharded import (
    ANY_LAYOUT,
    FORMAT,
    LATEST,
    CheckpointDir,
    atomic_write_text,
    read_meta,
    staged_dir,
    step_name,
    write_meta,
)
from sedd_scale.checksums import SUMS_FILE, file_record
from sedd_scale.config import Recipe, RecipeError, apply_overrides, from_dict, to_dict
from sedd_scale.distributed import deepspeed_files as ds_files
from sedd_scale.model.config import ModelConfig

# ModelConfig fields that decide tensor shapes and meaning; the rest (precision, dropout, ...) may change.
ARCHITECTURE = ("hidden_size", "n_heads", "n_blocks", "cond_dim", "mlp_ratio", "num_tokens", "graph",
                "scale_by_sigma", "rotary_base", "parametrization")


class ConversionError(ValueError):
    """A conversion that cannot be done as asked: the message names the problem and the fix."""


class CarriedLoader:
    """Stands in for the data loader during a conversion: it only carries the data position."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def __iter__(self):
        return iter(())

    def state_dict(self) -> dict | None:
        """The carried position."""
        return self.state

    def load_state_dict(self, state: dict | None) -> None:
        """Take a position (from a checkpoint being read)."""
        self.state = state


def find_step(path: str | Path) -> Path:
    """The checkpoint folder `path` names: a step_* folder, or a run directory's latest checkpoint."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    if not path.is_dir():
        raise ConversionError(f"checkpoint {path} does not exist")
    latest = CheckpointDir(path).latest()
    if latest is None:
        raise ConversionError(f"{path} is neither a checkpoint folder (meta.json) nor a run directory with a "
                              "`latest` pointer")
    return latest


def check_complete(step: Path, meta: dict) -> None:
    """Refuse a checkpoint with a rank's files missing, before any work (every file read is verified too)."""
    if meta["layout"] == ANY_LAYOUT:
        return
    world = int(meta["world_size"])
    missing = [f"rank_{r:05d}.pt" for r in range(world) if not (step / f"rank_{r:05d}.pt").is_file()]
    ds = step / ds_files.FOLDER
    if not ds.is_dir() or not any(ds.iterdir()):
        missing.append("deepspeed/ (model and optimizer shards)")
    if missing:
        raise ConversionError(f"checkpoint {step} is incomplete (written by {world} ranks): missing {missing}; "
                              "copy the whole step folder")


def _check_output(out: Path) -> None:
    """Refuse an existing output; missing parent folders are fine (`staged_dir` creates them when it writes)."""
    if out.exists():
        raise ConversionError(f"output {out} exists: choose a new directory (conversions never overwrite)")
    nearest = next(p for p in out.absolute().parents if p.exists())
    if not nearest.is_dir():
        raise ConversionError(f"output {out} cannot be created: {nearest} is a file, not a directory")


def build_trainer(recipe_data: dict, loader_state: dict | None = None, checkpoint_dir: str | None = None):
    """Process groups (from the launch environment) and a Trainer without data for `recipe_data`
    (checkpoints written to `checkpoint_dir`, default the recipe's)."""
    from sedd_scale.distributed import engine
    from sedd_scale.train.trainer import Trainer

    recipe = from_dict(Recipe, copy.deepcopy(recipe_data))
    layout, topology = engine.setup(recipe)
    return Trainer(recipe, layout, topology, loader=CarriedLoader(loader_state), checkpoint_dir=checkpoint_dir)


# ---------------------------------------------------------------------------------------------
# consolidate
METRICS_FILE = Path("tensorboard", "metrics.jsonl")  # in the run directory, where train.main's Metrics writes it


def last_validation(metrics: Path, step: int) -> dict[str, Any] | None:
    """The run's last validation ELBO at or before `step` from its metrics.jsonl (None when none was measured)."""
    if not metrics.is_file():
        return None
    found = None
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a full disk: the trainer drops it on resume too
            continue
        if isinstance(record, dict) and "valid/elbo_nats_per_token" in record and record.get("step", 0) <= step:
            found = {"step": record["step"], **{k.removeprefix("valid/"): v for k, v in record.items()
                                                if k.startswith("valid/")}}
    return found


def consolidate(checkpoint: str | Path, out: str | Path, *, weights: str = "ema", training_state: bool = False,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """A training checkpoint (run dir or step folder) -> a consolidated directory; returns a summary."""
    from sedd_scale.checkpoint import offline

    if weights not in ("ema", "raw"):
        raise ConversionError(f"weights must be 'ema' or 'raw', got {weights!r}")
    step, out = find_step(checkpoint), Path(out)
    meta = read_meta(step)
    check_complete(step, meta)
    _check_output(out)
    which = "ema" if weights == "ema" else "weights"
    state = offline.read_state(step, cons.TRAINING_CATEGORIES if training_state else (which,))
    recipe = from_dict(Recipe, meta["recipe"])
    c = state.counters
    provenance = {"source": str(step), "step": c["step"], "tokens_seen": c["tokens_seen"], "layout": c["layout"],
                  "recipe": meta["recipe"], "last_validation": last_validation(step.parent / METRICS_FILE, c["step"])}
    tensors = state.tensors[which]
    cons.write(out, recipe.model, recipe.diffusion.noise_spec(), tensors, which=weights, provenance=provenance,
               training=(state.tensors, c) if training_state else None, max_shard_bytes=max_shard_bytes,
               tokenizer=recipe.data.tokenizer)
    return {"step": c["step"], "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
            "layout": meta["layout"], "out": str(out)}


# ---------------------------------------------------------------------------------------------
# shard
def target_recipe(model: ModelConfig, saved: dict | None, *, recipe: str | Path | None, tp: int, pp: int, dp: int,
                  zero_stage: int | None, micro_batch: int | None, overrides: list[str] = (), where: str = "",
                  cp: int = 1) -> dict:
    """The recipe (as data) the new checkpoint is written under: `saved` (or the file `recipe`) with the new layout,
    checked against `model` (the checkpoint's) and the layout before any work."""
    if recipe is not None:
        from sedd_scale.config import parse_yaml

        data = parse_yaml(Path(recipe).read_text(encoding="utf-8"), str(recipe))
    elif saved is not None:
        data = copy.deepcopy(saved)
    else:
        raise ConversionError(f"{where} carries no training recipe (e.g. it came from the hub format): "
                              "pass --recipe RECIPE.yaml for the optimizer, data and schedule settings")
    parallel = dict(data.get("parallel") or {})
    parallel.update(tp=tp, pp=pp)
    if cp > 1 or "context_parallel" in parallel:  # a recipe without the key (older versions) keeps it absent
        parallel["context_parallel"] = cp
    if zero_stage is not None:
        parallel["zero_stage"] = zero_stage
    if micro_batch is not None:
        parallel["micro_batch"] = micro_batch
    data["parallel"] = parallel
    data = apply_overrides(data, list(overrides))
    parsed = from_dict(Recipe, copy.deepcopy(data))  # RecipeError for impossible layouts, before any work
    try:
        parsed.layout(tp * cp * pp * dp)
    except RecipeError as e:
        raise ConversionError(f"layout TP {tp} x CP {cp} x PP {pp} x DP {dp}: {e}") from None
    differ = {f: (getattr(model, f), getattr(parsed.model, f)) for f in ARCHITECTURE
              if getattr(model, f) != getattr(parsed.model, f)}
    if differ:
        raise ConversionError(f"the checkpoint does not match the recipe's model (checkpoint, recipe): {differ}")
    return data


def _write_run(out: Path, step: int, recipe_data: dict, write_state) -> Path:
    """A run directory `out` whose one step, `step`, holds a layout-free state written by `write_state(folder)`."""
    recipe_data = {**recipe_data, "checkpoint": {**recipe_data.get("checkpoint", {}), "dir": str(out)}}
    with staged_dir(out) as staging:
        folder = staging / step_name(step)
        folder.mkdir()
        write_state(folder / "state")
        written = [p for p in sorted(folder.rglob("*")) if p.is_file()]
        files = {}
        with bar(sum(p.stat().st_size for p in written), f"checksumming {out.name}") as progress:
            for p in written:  # the sha256 of every file meta.json records: minutes for a large state
                files[str(p.relative_to(folder))] = file_record(p)
                progress.update(files[str(p.relative_to(folder))]["bytes"])
        meta = {"format": FORMAT, "step": step, "layout": ANY_LAYOUT, "recipe": recipe_data, "world_size": None,
                "bytes": sum(r["bytes"] for r in files.values()), "files": files, "sums": SUMS_FILE}
        write_meta(folder, meta)
        atomic_write_text(staging / LATEST, folder.name)
    return out / step_name(step)


def shard(source: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, dp: int = 1,
          zero_stage: int | None = None, micro_batch: int | None = None, recipe: str | Path | None = None,
          overrides: list[str] = (), cp: int = 1) -> dict:
    """A consolidated directory -> a run directory `out` that a run under TP x CP x PP x DP (or any layout)
    resumes."""
    out = Path(out)
    _check_output(out)
    ckpt = cons.open_consolidated(source)
    recipe_data = target_recipe(ckpt.model, ckpt.config.get("recipe"), recipe=recipe, tp=tp, pp=pp, dp=dp,
                                zero_stage=zero_stage, micro_batch=micro_batch, overrides=overrides, where=str(source),
                                cp=cp)
    exact = ckpt.has_training_state
    step = ckpt.counters()["step"] if exact else 0
    return _summary(_write_run(out, step, recipe_data, lambda folder: shutil.copytree(ckpt.path, folder)), exact,
                    tp, pp, dp, cp)


def _summary(written: Path, exact: bool, tp: int, pp: int, dp: int, cp: int) -> dict:
    recipe = read_meta(written)["recipe"]
    return {"step": read_meta(written)["step"], "exact": exact, "checkpoint": str(written), "out": str(written.parent),
            "layout": {"tp": tp, **({"cp": cp} if cp > 1 else {}), "pp": pp, "dp": dp,
                       "zero_stage": recipe["parallel"]["zero_stage"]}}


def reshard(checkpoint: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, dp: int = 1,
            zero_stage: int | None = None, micro_batch: int | None = None, overrides: list[str] = (),
            cp: int = 1) -> dict:
    """A training checkpoint -> the same training state, layout-free, for a run under TP x CP x PP x DP."""
    from sedd_scale.checkpoint import offline

    step, out = find_step(checkpoint), Path(out)
    meta = read_meta(step)
    check_complete(step, meta)
    _check_output(out)
    saved = from_dict(Recipe, meta["recipe"])
    recipe_data = target_recipe(saved.model, meta["recipe"], recipe=None, tp=tp, pp=pp, dp=dp, zero_stage=zero_stage,
                                micro_batch=micro_batch, overrides=overrides, where=str(step), cp=cp)
    state = offline.read_state(step)
    provenance = {"source": str(step), "step": meta["step"], "tokens_seen": meta["tokens_seen"],
                  "layout": meta["layout"], "recipe": meta["recipe"]}

    def write(folder: Path) -> None:
        cons.write(folder, saved.model, saved.diffusion.noise_spec(), state.tensors["weights"], which="raw",
                   provenance=provenance, training=(state.tensors, state.counters))

    return _summary(_write_run(out, meta["step"], recipe_data, write), True, tp, pp, dp, cp)


# ---------------------------------------------------------------------------------------------
# hub format
def to_hub(source: str | Path, out: str | Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """A consolidated directory -> the reference's hub format (config.json + model.safetensors), verified."""
    out = Path(out)
    _check_output(out)
    ckpt = cons.open_consolidated(source)
    cfg = ckpt.model
    if cfg.mlp_ratio != 4:
        raise ConversionError(f"the hub format has no mlp_ratio (the reference uses 4); this model has {cfg.mlp_ratio}")
    weights = dict(ckpt.weights())
    state = hub.model_to_hub(cfg, weights)
    config = hub.exported_hub_config(cfg, noise=hub.noise_to_hub(ckpt.noise), provenance=ckpt.config)
    with staged_dir(out) as staging:
        hub.write_hub(staging, config, state, max_shard_bytes=max_shard_bytes, bundle_from=ckpt.path)
        config_back, state_back = hub.read_hub(staging)
        back = hub.hub_to_model(hub.model_config_from_hub(config_back, **_non_hub_fields(cfg)), state_back)
        bad = [k for k in back if not torch.equal(back[k], weights[k])]
        if bad or config_back != config:
            raise ConversionError(f"verification of {out} failed: {bad or 'config.json differs'}")
    return out


def _non_hub_fields(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig fields the hub format does not carry (kept from our config on a round trip)."""
    carried = {"num_tokens", "graph", "hidden_size", "cond_dim", "n_blocks", "n_heads", "dropout",
               "scale_by_sigma", "name", "length", "parametrization"}
    return {f.name: getattr(cfg, f.name) for f in fields(ModelConfig) if f.name not in carried}


def from_hub(source: str | Path, out: str | Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
             **model_overrides) -> Path:
    """The reference's hub format -> a consolidated directory (weights only), verified."""
    out = Path(out)
    _check_output(out)
    config, state = hub.read_hub(source)
    cfg = hub.model_config_from_hub(config, **model_overrides)
    has_bundle = (Path(source) / bundle.TOKENIZER_CONFIG).is_file()  # an export of ours; the reference's has none
    return cons.write(out, cfg, hub.noise_from_hub(config), hub.hub_to_model(cfg, state), which="hub",
                      provenance={"source": str(source), "hub_config": config}, max_shard_bytes=max_shard_bytes,
                      tokenizer=bundle.TOKENIZER_BY_VOCAB.get(cfg.num_tokens),
                      bundle_from=Path(source) if has_bundle else None)


def describe(path: str | Path) -> dict:
    """What a checkpoint directory is (training, consolidated or hub) and what it holds."""
    path = Path(path)
    if cons.is_consolidated(path):
        ckpt = cons.open_consolidated(path)
        return {"kind": "consolidated", "weights": ckpt.config["weights"], "training_state": ckpt.has_training_state,
                "model": to_dict(ckpt.model), "step": ckpt.config.get("step")}
    if (path / hub.CONFIG_FILE).is_file() and hub.has_weights(path):
        return {"kind": "hub", "config": hub.read_hub_config(path)}
    step = find_step(path)
    meta = read_meta(step)
    return {"kind": "training", "folder": str(step), "step": meta["step"], "layout": meta["layout"]}
