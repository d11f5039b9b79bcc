"""The layout-free training state: whole tensors by model key, gathered from or loaded into a
`Trainer` under any TP x CP x PP x DP x ZeRO layout. Resharding is `gather` under one layout, then
`load` under another.

Tensor categories: "weights" (the fp32 master weights the optimizer updates), "ema" (the EMA
shadow), "exp_avg" and "exp_avg_sq" (AdamW's moments). Every tensor is whole: TP slices joined by
their split kind (`hub.model_kinds`, vocabulary padding dropped), ZeRO partitions gathered,
pipeline stages collected. `counters` hold the rest of what an exact resume needs.

Where DeepSpeed keeps masters and moments: ZeRO-1/2 and its bf16 optimizer in flat per-group
fp32 partitions, ZeRO-3 in flat per-rank partitions, both reached per parameter through
`deepspeed.utils.safe_{get,set}_full_*`; without ZeRO the torch optimizer holds them per
parameter. A fresh engine has no AdamW state until its first step, so `load` creates it. The step count is
per parameter (torch's AdamW) or per group (apex's FusedAdam): `optim_state` reads and sets either.
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sedd_scale.compat  # noqa: F401  (before megatron / deepspeed)

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from megatron.core import parallel_state as ps
from torch import Tensor, nn

from sedd_scale.checkpoint.consolidated import TRAINING_CATEGORIES
from sedd_scale.checkpoint.hub import gather_tp_tensor, model_kinds, shard_tensor
from sedd_scale.checkpoint.sharded import CheckpointError
from sedd_scale.distributed import deepspeed_files as ds_files
from sedd_scale.distributed import optim_state

CATEGORIES = TRAINING_CATEGORIES
MOMENTS = ("exp_avg", "exp_avg_sq")
# Counters that must survive a conversion unchanged (the verification compares them).
CARRIED = ("step", "tokens_seen", "skipped_total", "optimizer_step", "lrs", "ema_num_updates", "loader")


@dataclass
class FullState:
    """Whole tensors {category: {model key: tensor}} and the counters of one training state."""

    tensors: dict[str, dict[str, Tensor]]
    counters: dict[str, Any]


def local_keys(trainer) -> list[tuple[str, nn.Parameter]]:
    """(model key, parameter) of this rank, in `engine.module.parameters()` order (the EMA's order)."""
    out = [(trainer.runner.model_key(name), p) for name, p in trainer.engine.module.named_parameters()]
    unknown = sorted(set(k for k, _ in out) - set(model_kinds(trainer.model_cfg)))
    if unknown:
        raise RuntimeError(f"parameters without a model key (a changed module layout?): {unknown}")
    return out


def _updated_tensors(trainer) -> list[tuple[Tensor, dict]]:
    """(tensor AdamW updates, its param group): parameters, or DeepSpeed's flat fp32 partitions."""
    base, wrapper = trainer.base_optimizer(), trainer.engine.optimizer
    flat = getattr(wrapper, "fp32_partitioned_groups_flat", None)
    if flat is not None:  # ZeRO-3 takes its partitions out of the param groups between steps
        return [(t, base.param_groups[wrapper.sub_group_to_group_id[i]]) for i, t in enumerate(flat)]
    return [(p, g) for g in base.param_groups for p in g["params"]]


def _ensure_moments(trainer) -> None:
    """Create AdamW's state where a fresh engine has none yet, and link DeepSpeed's per-parameter views to it."""
    base = trainer.base_optimizer()
    for p, group in _updated_tensors(trainer):
        if not base.state.get(p):
            base.state[p] = optim_state.fresh_state(base, p, group)
    for p in trainer.engine.module.parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            continue
        flat = base.param_groups[mapping.param_group_index]["params"][0]
        if mapping.hp_fragment.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
            raise RuntimeError("DeepSpeed's fp32 fragment of a parameter is not in its optimizer group's flat "
                               "partition: this DeepSpeed version lays out ZeRO state differently")
        mapping.set_optim_state_fragment(flat, base.state[flat])


def _shape(p: nn.Parameter) -> torch.Size:
    return p.ds_shape if ds_files.zero3_partitioned(p) else p.shape


def _get(trainer, p: nn.Parameter, key: str | None) -> Tensor:
    """This TP rank's whole fp32 master weight (key None) or AdamW moment of `p` (a DP collective under ZeRO)."""
    if ds_files.zero3_partitioned(p) or ds_files.zero_fragmented(p):
        value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        return value.detach().float().reshape(_shape(p)).cpu()
    value = p if key is None else trainer.base_optimizer().state[p][key]
    return value.detach().float().cpu().clone()


def _set(trainer, p: nn.Parameter, key: str | None, value: Tensor) -> None:
    """Set this TP rank's whole fp32 master weight (and the module's copy) or an AdamW moment of `p`."""
    value = value.to(p.device)
    if ds_files.zero3_partitioned(p) or ds_files.zero_fragmented(p):
        (safe_set_full_fp32_param(p, value) if key is None else safe_set_full_optimizer_state(p, value, key))
    elif key is not None:
        trainer.base_optimizer().state[p][key].copy_(value)
    if key is not None:
        return
    if ds_files.zero3_partitioned(p):  # the module's own partition (over DeepSpeed's data group, DP x CP)
        part = p.ds_tensor
        dp = ps.get_data_parallel_world_size(with_context_parallel=True)
        rank = ps.get_data_parallel_rank(with_context_parallel=True)
        flat = F.pad(value.flatten(), (0, part.numel() * dp - value.numel()))
        part.data.copy_(flat[rank * part.numel():(rank + 1) * part.numel()])
    else:
        p.data.copy_(value)


def counters(trainer) -> dict[str, Any]:
    """The non-tensor state a resume needs, checked to be the same on every rank where it must be."""
    base = trainer.base_optimizer()
    loader = trainer.loader.state_dict()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, loader)
    if any(s != loader for s in everyone):
        raise CheckpointError("the ranks' data-loader states differ (a loader whose stream depends on the "
                              "layout): the data position cannot be carried to another layout")
    return {"step": trainer.step, "tokens_seen": trainer.tokens_seen, "skipped_total": base.skipped_total,
            "optimizer_step": optim_state.step_count(base), "lrs": [float(g["lr"]) for g in base.param_groups],
            "lr_scheduler": trainer.engine.lr_scheduler.state_dict(), "ema_num_updates": trainer.ema.num_updates,
            "loader": loader, "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                      "numpy": np.random.get_state()},
            "layout": trainer.layout.as_dict()}


def gather(trainer) -> FullState | None:
    """The whole training state on global rank 0 (None on other ranks); a collective over every rank."""
    cfg, kinds = trainer.model_cfg, model_kinds(trainer.model_cfg)
    _ensure_moments(trainer)
    meta = counters(trainer)
    local: dict[str, dict[str, Tensor]] = {c: {} for c in CATEGORIES}
    ema = trainer.ema.whole_tensors()  # the EMA is sharded over DP: a collective
    for (key, p), average in zip(local_keys(trainer), ema, strict=True):
        local["weights"][key] = _get(trainer, p, None)
        for m in MOMENTS:
            local[m][key] = _get(trainer, p, m)
        local["ema"][key] = average.view(_shape(p)).cpu().clone()
    if ps.get_data_parallel_rank(with_context_parallel=True) != 0:  # DP and CP replicas hold the same whole tensors
        return None
    stage = {c: {k: gather_tp_tensor(v, kinds[k], cfg) for k, v in d.items()} for c, d in local.items()}
    if ps.get_tensor_model_parallel_rank() != 0:
        return None
    stages = [stage]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        group = ps.get_pipeline_model_parallel_group()
        stages = [None] * ps.get_pipeline_model_parallel_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(stage, stages, dst=0, group=group)
    if dist.get_rank() != 0:
        return None
    tensors = {c: {k: v for s in stages for k, v in s[c].items()} for c in CATEGORIES}
    missing = sorted(set(kinds) - set(tensors["weights"]))
    if missing:
        raise RuntimeError(f"no pipeline stage holds {missing}")
    return FullState({c: dict(sorted(d.items())) for c, d in tensors.items()}, meta)


def load(trainer, tensors: Mapping[str, Mapping[str, Tensor]], meta: dict[str, Any] | None) -> None:
    """Set this rank's shards from whole tensors (every rank reads only its own keys) and the counters.

    `meta` None starts training afresh from `tensors["weights"]` (EMA = weights, no AdamW moments, step 0).
    """
    cfg, kinds = trainer.model_cfg, model_kinds(trainer.model_cfg)
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    if meta is not None:
        _ensure_moments(trainer)
    keys = local_keys(trainer)

    def local(category: str, key: str) -> Tensor:
        return shard_tensor(tensors[category][key].float(), kinds[key], cfg, tp_rank, tp).contiguous()

    with torch.no_grad():
        for i, (key, p) in enumerate(keys):
            weight = local("weights", key)
            _set(trainer, p, None, weight)
            trainer.ema.set_whole(i, local("ema", key) if meta is not None else weight)
            if meta is not None:
                for m in MOMENTS:
                    _set(trainer, p, m, local(m, key))
    if meta is None:
        return
    base = trainer.base_optimizer()
    optim_state.set_step(base, meta["optimizer_step"])
    if len(meta["lrs"]) != len(base.param_groups):
        raise CheckpointError(f"the state has {len(meta['lrs'])} optimizer groups, this model "
                              f"{len(base.param_groups)}")
    for group, lr in zip(base.param_groups, meta["lrs"]):
        group["lr"] = lr
    trainer.engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    trainer.ema.num_updates = meta["ema_num_updates"]
    trainer.step, trainer.tokens_seen = meta["step"], meta["tokens_seen"]
    base.skipped_total = meta["skipped_total"]
    trainer.loader.load_state_dict(meta["loader"])
    torch.set_rng_state(meta["rng"]["torch"])
    random.setstate(meta["rng"]["python"])
    np.random.set_state(meta["rng"]["numpy"])


def differences(a: FullState, b: FullState, *, categories=CATEGORIES, counters: bool = True) -> list[str]:
    """What differs between two states (bitwise tensors, carried counters); empty when identical."""
    out = []
    for c in categories:
        if set(a.tensors[c]) != set(b.tensors[c]):
            out.append(f"{c}: keys differ ({sorted(set(a.tensors[c]) ^ set(b.tensors[c]))})")
            continue
        for k, t in a.tensors[c].items():
            u = b.tensors[c][k]
            if t.shape != u.shape or not torch.equal(t.float(), u.float()):
                detail = (f"shape {tuple(t.shape)} vs {tuple(u.shape)}" if t.shape != u.shape
                          else f"max |diff| {float((t.float() - u.float()).abs().max()):.3g}")
                out.append(f"{c}/{k}: {detail}")
    for k in CARRIED if counters else ():
        if a.counters.get(k) != b.counters.get(k):
            out.append(f"counter {k}: {a.counters.get(k)!r} vs {b.counters.get(k)!r}")
    return out
