"""Checkpoint conversions (the library behind tools/convert_checkpoint.py); each one verifies itself.

* consolidate: a training checkpoint (any TP/PP/DP/ZeRO) -> a consolidated directory (EMA or raw
  weights; optionally the whole training state). Runs the saved layout's ranks, loads the
  checkpoint through DeepSpeed, gathers every tensor whole (`checkpoint.full_state`).
* shard: a consolidated directory -> a training checkpoint under a new layout. With the training
  state it resumes exactly; with weights only it starts training from them (step 0).
* reshard: consolidate (with training state) into a temporary directory, then shard.
* to_hub / from_hub: consolidated <-> the reference's hub format (a renaming; one process).

Sharded work runs as local CPU processes joined by gloo (`sedd_scale.spawn`), so a conversion
needs no GPUs and no launcher. Outputs are written to a temporary name, reread and compared with
what was meant, and only then renamed into place; an existing output is never touched.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from sedd_scale.checkpoint import consolidated as cons
from sedd_scale.checkpoint import hub
from sedd_scale.checkpoint.sharded import CheckpointDir, CheckpointError, read_meta, staged_dir
from sedd_scale.config import Recipe, RecipeError, apply_overrides, from_dict, to_dict
from sedd_scale.model.config import ModelConfig

# ModelConfig fields that decide tensor shapes and meaning; the rest (precision, dropout, ...) may change.
ARCHITECTURE = ("hidden_size", "n_heads", "n_blocks", "cond_dim", "mlp_ratio", "num_tokens", "graph",
                "scale_by_sigma", "rotary_base")


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
    """Refuse a checkpoint with a rank's files missing, before any process starts."""
    world = int(meta["world_size"])
    missing = [f"rank_{r:05d}.pt" for r in range(world) if not (step / f"rank_{r:05d}.pt").is_file()]
    ds = step / "deepspeed"
    if not ds.is_dir() or not any(ds.iterdir()):
        missing.append("deepspeed/ (model and optimizer shards)")
    if missing:
        raise ConversionError(f"checkpoint {step} is incomplete (written by {world} ranks): missing {missing}; "
                              "copy the whole step folder")


def _check_output(out: Path) -> None:
    if out.exists():
        raise ConversionError(f"output {out} exists: choose a new directory (conversions never overwrite)")
    if not out.parent.exists():
        raise ConversionError(f"output's parent {out.parent} does not exist")


def _threads(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def _launch(fn, world: int, *args) -> list:
    from sedd_scale.spawn import launch

    # Conversion runs on CPU (gloo) on whatever node it is started: the workers inherit hidden GPUs.
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        return launch(fn, world, *args, timeout=24 * 3600.0, group_timeout_s=3600.0, threads=_threads(world))
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def build_trainer(recipe_data: dict, loader_state: dict | None = None, checkpoint_dir: str | None = None):
    """Process groups (from the launch environment) and a Trainer without data for `recipe_data`
    (checkpoints written to `checkpoint_dir`, default the recipe's)."""
    from sedd_scale import engine
    from sedd_scale.trainer import Trainer

    recipe = from_dict(Recipe, copy.deepcopy(recipe_data))
    layout, topology = engine.setup(recipe)
    return Trainer(recipe, layout, topology, loader=CarriedLoader(loader_state), checkpoint_dir=checkpoint_dir)


# ---------------------------------------------------------------------------------------------
# consolidate
def _consolidate_rank(step: str, saved_recipe: dict, out: str, which: str, training: bool) -> dict | None:
    from sedd_scale import parallel
    from sedd_scale.checkpoint import full_state

    trainer = build_trainer({**saved_recipe, "checkpoint": {"dir": str(Path(step).parent), "resume": False}})
    trainer.load(Path(step))
    state = full_state.gather(trainer)
    parallel.destroy_parallel()
    if state is None:
        return None
    recipe = trainer.recipe
    weights = state.tensors["ema" if which == "ema" else "weights"]
    provenance = {"source": str(step), "step": state.counters["step"], "tokens_seen": state.counters["tokens_seen"],
                  "layout": state.counters["layout"], "recipe": saved_recipe}
    cons.write(out, recipe.model, recipe.diffusion.noise_spec(), weights, which=which, provenance=provenance,
               training=(state.tensors, state.counters) if training else None)
    return {"step": state.counters["step"], "tensors": len(weights),
            "parameters": sum(t.numel() for t in weights.values())}


def consolidate(checkpoint: str | Path, out: str | Path, *, weights: str = "ema", training_state: bool = False) -> dict:
    """A training checkpoint (run dir or step folder) -> a consolidated directory; returns a summary."""
    if weights not in ("ema", "raw"):
        raise ConversionError(f"weights must be 'ema' or 'raw', got {weights!r}")
    step, out = find_step(checkpoint), Path(out)
    meta = read_meta(step)
    check_complete(step, meta)
    _check_output(out)
    summary = _launch(_consolidate_rank, int(meta["world_size"]), str(step), meta["recipe"], str(out), weights,
                      training_state)[0]
    return {**summary, "layout": meta["layout"], "out": str(out)}


# ---------------------------------------------------------------------------------------------
# shard
def target_recipe(source: cons.Consolidated, *, recipe: str | Path | None, tp: int, pp: int, dp: int,
                  zero_stage: int | None, micro_batch: int | None, overrides: list[str] = ()) -> dict:
    """The recipe (as data) the new checkpoint is written under: the saved one (or `recipe`) with the new
    layout, checked (model, layout) before any work."""
    if recipe is not None:
        from sedd_scale.config import parse_yaml

        data = parse_yaml(Path(recipe).read_text(encoding="utf-8"), str(recipe))
    elif "recipe" in source.config:
        data = copy.deepcopy(source.config["recipe"])
    else:
        raise ConversionError(f"{source.path} carries no training recipe (e.g. it came from the hub format): "
                              "pass --recipe RECIPE.yaml for the optimizer, data and schedule settings")
    parallel = dict(data.get("parallel") or {})
    parallel.update(tp=tp, pp=pp)
    if zero_stage is not None:
        parallel["zero_stage"] = zero_stage
    if micro_batch is not None:
        parallel["micro_batch"] = micro_batch
    data["parallel"] = parallel
    data = apply_overrides(data, list(overrides))
    parsed = from_dict(Recipe, copy.deepcopy(data))  # RecipeError for impossible layouts, before any work
    try:
        parsed.layout(tp * pp * dp)
    except RecipeError as e:
        raise ConversionError(f"layout TP {tp} x PP {pp} x DP {dp}: {e}") from None
    saved, wanted = source.model, parsed.model
    differ = {f: (getattr(saved, f), getattr(wanted, f)) for f in ARCHITECTURE if getattr(saved, f) != getattr(wanted, f)}
    if differ:
        raise ConversionError(f"the checkpoint does not match the recipe's model (checkpoint, recipe): {differ}")
    return data


def _shard_rank(source: str, recipe_data: dict, staging: str) -> dict | None:
    from sedd_scale import parallel
    from sedd_scale.checkpoint import full_state

    ckpt = cons.open_consolidated(source)
    exact = ckpt.has_training_state
    tensors = ckpt.training_tensors() if exact else {"weights": ckpt.weights()}
    meta = ckpt.counters() if exact else None
    # A fresh start (weights only) must come out with the EMA equal to the weights and no carried counters.
    expected = full_state.FullState(dict(tensors) if exact else {**tensors, "ema": tensors["weights"]}, meta or {})
    categories = full_state.CATEGORIES if exact else ("weights", "ema")

    def build():
        # The recipe names the final run directory; the shards go to the staging one renamed into place later.
        return build_trainer(recipe_data, meta["loader"] if meta else None, checkpoint_dir=staging)

    def verify(trainer, what: str) -> None:
        import torch.distributed as dist

        state = full_state.gather(trainer)
        verdict = [[] if state is None else
                   full_state.differences(state, expected, categories=categories, counters=exact)]
        dist.broadcast_object_list(verdict, src=0)  # every rank stops together, nothing half-written stays
        if verdict[0]:
            raise CheckpointError(f"{what}: the converted state differs from the source:\n  " +
                                  "\n  ".join(verdict[0][:20]))

    trainer = build()
    full_state.load(trainer, tensors, meta)
    verify(trainer, "after loading into the new layout")
    trainer.save(sync=True)
    written = trainer.saver.last["path"]
    parallel.destroy_parallel()
    trainer = build()
    trainer.load(written)  # a fresh engine reads what was written
    verify(trainer, f"after rereading {written}")
    summary = {"step": trainer.step, "layout": trainer.layout_dict(), "checkpoint": written.name}
    parallel.destroy_parallel()
    return summary


def shard(source: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, dp: int = 1,
          zero_stage: int | None = None, micro_batch: int | None = None, recipe: str | Path | None = None,
          overrides: list[str] = ()) -> dict:
    """A consolidated directory -> a training checkpoint run directory `out` under TP x PP x DP."""
    out = Path(out)
    _check_output(out)
    ckpt = cons.open_consolidated(source)
    recipe_data = target_recipe(ckpt, recipe=recipe, tp=tp, pp=pp, dp=dp, zero_stage=zero_stage,
                                micro_batch=micro_batch, overrides=overrides)
    recipe_data["checkpoint"] = {**recipe_data.get("checkpoint", {}), "dir": str(out)}
    with staged_dir(out) as staging:
        summary = _launch(_shard_rank, tp * pp * dp, str(ckpt.path), recipe_data, str(staging))[0]
    return {**summary, "checkpoint": str(out / summary["checkpoint"]), "exact": ckpt.has_training_state,
            "out": str(out)}


def reshard(checkpoint: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, dp: int = 1,
            zero_stage: int | None = None, micro_batch: int | None = None, overrides: list[str] = ()) -> dict:
    """A training checkpoint -> the same training state under another layout (through a temporary consolidated dir)."""
    out = Path(out)
    _check_output(out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.consolidated-") as tmp:
        full = Path(tmp) / "full"
        consolidate(checkpoint, full, weights="raw", training_state=True)
        return shard(full, out, tp=tp, pp=pp, dp=dp, zero_stage=zero_stage, micro_batch=micro_batch,
                     overrides=overrides)


# ---------------------------------------------------------------------------------------------
# hub format
def to_hub(source: str | Path, out: str | Path) -> Path:
    """A consolidated directory -> the reference's hub format (config.json + model.safetensors), verified."""
    out = Path(out)
    _check_output(out)
    ckpt = cons.open_consolidated(source)
    cfg = ckpt.model
    if cfg.mlp_ratio != 4:
        raise ConversionError(f"the hub format has no mlp_ratio (the reference uses 4); this model has {cfg.mlp_ratio}")
    weights = dict(ckpt.weights())
    state = hub.model_to_hub(cfg, weights)
    config = hub.hub_config(cfg, noise=hub.noise_to_hub(ckpt.noise))
    with staged_dir(out) as staging:
        hub.write_hub(staging, config, state)
        config_back, state_back = hub.read_hub(staging)
        back = hub.hub_to_model(hub.model_config_from_hub(config_back, **_non_hub_fields(cfg)), state_back)
        bad = [k for k in back if not torch.equal(back[k], weights[k])]
        if bad or config_back != config:
            raise ConversionError(f"verification of {out} failed: {bad or 'config.json differs'}")
    return out


def _non_hub_fields(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig fields the hub format does not carry (kept from our config on a round trip)."""
    carried = {"num_tokens", "graph", "hidden_size", "cond_dim", "n_blocks", "n_heads", "dropout",
               "scale_by_sigma", "name", "length"}
    return {f.name: getattr(cfg, f.name) for f in fields(ModelConfig) if f.name not in carried}


def from_hub(source: str | Path, out: str | Path, **model_overrides) -> Path:
    """The reference's hub format -> a consolidated directory (weights only), verified."""
    out = Path(out)
    _check_output(out)
    config, state = hub.read_hub(source)
    cfg = hub.model_config_from_hub(config, **model_overrides)
    return cons.write(out, cfg, hub.noise_from_hub(config), hub.hub_to_model(cfg, state), which="hub",
                      provenance={"source": str(source), "hub_config": config})


def describe(path: str | Path) -> dict:
    """What a checkpoint directory is (training, consolidated or hub) and what it holds."""
    path = Path(path)
    if cons.is_consolidated(path):
        ckpt = cons.open_consolidated(path)
        return {"kind": "consolidated", "weights": ckpt.config["weights"], "training_state": ckpt.has_training_state,
                "model": to_dict(ckpt.model), "step": ckpt.config.get("step")}
    if (path / hub.CONFIG_FILE).is_file() and (path / hub.WEIGHTS_FILE).is_file():
        return {"kind": "hub", "config": json.loads((path / hub.CONFIG_FILE).read_text())}
    step = find_step(path)
    meta = read_meta(step)
    return {"kind": "training", "folder": str(step), "step": meta["step"], "layout": meta["layout"]}
