"""Which recipe changes a resumed run accepts: every key is classified, and nothing changes silently.

A resume compares the current recipe with the one saved in the checkpoint's meta.json, key by key
(dotted paths such as `optim.lr`):

* APPLIED keys are taken from the current recipe: the optimizer and its schedule, the run's length
  and intervals, throughput-only settings (micro batch, workers, activation checkpointing). Each
  change is reported so that the logs say what the resumed run does differently.
* The layout (tp, context_parallel, pp, dp = what the world size leaves, zero_stage) selects how the saved
  shards are cut: a change needs `convert_checkpoint.py reshard`, which carries the whole training state over.
* Every other key changes what is being learned (the model, the graph, the noise process, the
  tokenizer, the data stream, the precision of the optimizer state) and is refused, naming the key,
  both values and the way forward.

`tests/test_recipe_changes.py` checks that every field of `Recipe` is classified here, so a new
recipe key must be placed in one of the tables before it can be used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sedd_scale.layout import layout_changes, reshard_args

# key -> why it may change on resume
APPLIED: dict[str, str] = {
    **{f"optim.{k}": "optimizer" for k in ("lr", "betas", "eps", "weight_decay", "warmup", "schedule", "min_lr",
                                           "grad_clip")},
    **{f"train.{k}": "run length and intervals" for k in ("steps", "log_every", "eval_every", "save_every",
                                                          "keep_last", "max_nonfinite_steps", "peak_tflops",
                                                          "eval_batches", "eval_draws", "sample_steps",
                                                          "async_save")},
    "train.sampler": "the sampler of the example texts only",
    **{f"train.wandb.{k}": "monitoring only"
       for k in ("project", "entity", "name", "mode", "dir")},
    "train.ema": "EMA decay (the shadow continues with the new decay)",
    "parallel.micro_batch": "throughput only (the global batch and the data stream are unchanged)",
    "parallel.distributed_timeout_minutes": "how long a collective may wait before the run fails",
    **{f"parallel.{k}": "communication scheduling only (the same reductions; ZeRO's saved partitions do not depend "
                        "on it)" for k in ("zero_overlap_comm", "zero_contiguous_gradients", "zero_reduce_bucket_size",
                                           "zero_prefetch_bucket_size")},
    "data.num_workers": "throughput only (the stream does not depend on the worker count)",
    "data.valid": "validation data only",
    "data.prepare": "used only when the data is missing",
    "data.cache_dir": "where shards given as URLs are cached (their content is checked)",
    "model.activation_checkpointing": "memory/compute trade-off only (the same arithmetic)",
    "parallel.sequence_parallel": "memory/communication trade-off only (activations split over TP; no parameter or "
                                  "optimizer state is sharded differently)",
    "model.compile": "speed only (the same arithmetic, fused by torch.compile)",
    "model.dropout": "regularisation",
    "model.attention_dropout": "regularisation",
    "model.name": "a label",
    "checkpoint.dir": "the run directory itself",
    "checkpoint.resume": "whether to resume",
    "checkpoint.start_over": "whether to discard the run's checkpoints",
    "checkpoint.init_from": "where a fresh run starts from (a resumed run continues its own checkpoint instead)",
}
# compared as the resolved layout (a context-parallel change moves ZeRO's partitions, whose group is DP x CP)
LAYOUT = ("parallel.tp", "parallel.pp", "parallel.zero_stage", "parallel.context_parallel")
# key -> what it changes (refused on resume)
REFUSED: dict[str, str] = {
    **{f"model.{k}": "the model" for k in ("hidden_size", "n_heads", "n_blocks", "cond_dim", "mlp_ratio",
                                           "num_tokens", "scale_by_sigma", "length", "rotary_base",
                                           "vocab_multiple")},
    "model.graph": "the graph",
    "model.parametrization": "what the output means",
    "model.precision": "the precision of the weights and the optimizer state",
    **{f"diffusion.{k}": "the noise process" for k in ("noise", "noise_eps", "sigma_min", "sigma_max",
                                                       "sampling_eps", "stratified")},
    "diffusion.objective": "the training objective",
    "data.tokenizer": "the tokenizer",
    **{f"data.{k}": "the data stream" for k in ("manifests", "weights", "seq_len", "skip_corrupt")},
    "parallel.global_batch": "the data stream (step j reads global sequences [j*G, (j+1)*G))",
    "train.seed": "the data stream and the noise of every step",
}


@dataclass(frozen=True)
class Change:
    """One key whose value differs between the saved and the current recipe."""

    key: str
    saved: Any
    now: Any

    def describe(self) -> str:
        """`key: saved X, now Y`."""
        return f"{self.key}: saved {self.saved!r}, now {self.now!r}"


class ResumeRefused(ValueError):
    """The current recipe cannot continue the saved run; the message lists the keys and the way forward."""


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """A nested recipe mapping as {dotted key: value}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changes(saved: dict, current: dict) -> list[Change]:
    """Every key whose value differs between two resolved recipes (`config.to_dict` of each), by key."""
    a, b = flatten(saved), flatten(current)
    return [Change(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def check_resume(saved: dict, current: dict, saved_layout: dict, layout: dict, *, checkpoint: str,
                 run_dir: str) -> list[Change]:
    """The changes a resume applies from `current`; ResumeRefused naming every change it cannot apply.

    `saved` / `current` are resolved recipes (`to_dict(Recipe)`: keys a recipe left out hold their
    defaults), `saved_layout` / `layout` the `Layout.as_dict()` the checkpoint was written under and
    the one this run would use. A key in no table is refused: unknown means unsafe.
    """
    found = [c for c in changes(saved, current) if c.key not in LAYOUT]  # the layout is compared whole below
    applied = [c for c in found if c.key in APPLIED]
    lines = [f"  {c.describe()} (changes {REFUSED.get(c.key, 'an unclassified setting')})"
             for c in found if c.key not in APPLIED]
    moved = {} if saved_layout == "any" else layout_changes(saved_layout, layout)  # "any": a resharded state
    lines += [f"  layout {k}: saved {a}, now {b}" for k, (a, b) in moved.items()]
    if not lines:
        return applied
    forward = []
    if moved or any(c.key == "model.precision" for c in found):
        forward.append(f"to continue this run under another layout or precision, convert it first: python "
                       f"tools/convert_checkpoint.py reshard {run_dir} NEW_DIR {reshard_args(layout)} "
                       "[--set model.precision=...], then train with checkpoint.dir=NEW_DIR")
    forward += ["to start a new run, set a new checkpoint.dir (or checkpoint.resume=false with "
                "checkpoint.start_over=true to discard this run's checkpoints)",
                f"to fine-tune from this run's weights (a fresh optimizer at step 0): python "
                f"tools/convert_checkpoint.py consolidate {run_dir} WEIGHTS --weights ema, then train with "
                "checkpoint.init_from=WEIGHTS and a new checkpoint.dir (or python tools/convert_checkpoint.py shard "
                "WEIGHTS NEW_DIR --recipe NEW_RECIPE.yaml)",
                "or resume with the saved values"]
    raise ResumeRefused(f"cannot resume {checkpoint} with this recipe: these settings differ from the saved "
                        "run and would change what it learns or how it is stored:\n" + "\n".join(lines) +
                        "\nWays forward:\n" + "\n".join(f"  - {f}" for f in forward))
