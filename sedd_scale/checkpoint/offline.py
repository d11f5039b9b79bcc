"""A training checkpoint's whole state read from its files in one process, whatever world wrote it.

Like DeepSpeed's zero_to_fp32 and universal-checkpoint tools, this reads every rank's files directly
(no process groups, no engines) and joins the shards: DP partitions of the fp32 master weights and
AdamW moments, TP slices (`hub.unshard_tensors`), pipeline stages. The result is the `FullState`
that `full_state.gather` collects from live engines, bit for bit (tests compare the two).

Where DeepSpeed 0.16-0.19 keeps what (rank = tp + TP * (cp + CP * (dp + DP * pp)); mp = pp * TP + tp; DeepSpeed's
data rank d = cp + CP * dp over its data group of D = DP x CP ranks, ZeRO's partitions):
* ZeRO-1/2 (`zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt`) and its bf16 optimizer
  (`bf16_zero_pp_...`): per param group, this DP rank's flat fp32 partition and the AdamW moments of
  it; `param_slice_mappings` says which slice of each parameter's flattened elements it holds.
* ZeRO-3 (same file name): per group, each parameter's ceil(n / D) partition in parameter order
  (`param_shapes` of `zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt`), padded at the end.
* No ZeRO, fp32: the module's weights and torch's AdamW state in `mp_rank_{mp:02d}_model_states.pt`
  (pipeline stages keep their weights in `layer_{index:02d}-model_{tp:02d}-model_states.pt`).
* Ours, `rank_{rank:05d}.pt`: the EMA shard of that rank over the D data ranks (`ema.py`), the counters,
  and the names of the rank's parameters in the EMA's order.

Files are read one at a time, each checked against the sizes and sha256 of meta.json, and only the
slices wanted are kept: peak memory is about the state produced plus the largest file.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sedd_scale.checkpoint.consolidated import TRAINING_CATEGORIES
from sedd_scale.checkpoint.files import read_verified
from sedd_scale.checkpoint.hub import model_kinds, unshard_tensors
from sedd_scale.checkpoint.progress import bar
from sedd_scale.checkpoint.sharded import ANY_LAYOUT, CheckpointError, read_meta
from sedd_scale.checksums import file_record
from sedd_scale.config import Recipe, from_dict
from sedd_scale.distributed import deepspeed_files as ds_files
from sedd_scale.distributed import optim_state
from sedd_scale.layout import shard_bounds

MOMENTS = ("exp_avg", "exp_avg_sq")
_FIX = "this checkpoint cannot be converted; use an earlier step (or restore the file from a copy)"


class _Reader:
    """One step folder: its meta, its layout, and verified reads of its files."""

    def __init__(self, step: Path):
        self.step = Path(step)
        self.meta = read_meta(self.step)
        layout = self.meta["layout"]
        self.tp, self.pp, self.dp, self.zero = layout["tp"], layout["pp"], layout["dp"], layout["zero_stage"]
        self.cp = layout.get("cp", 1)  # checkpoints from before context parallelism ran CP 1
        self.data = self.dp * self.cp  # DeepSpeed's data group: ZeRO partitions over DP x CP
        self.recipe = from_dict(Recipe, self.meta["recipe"])
        self.cfg = self.recipe.model
        self.bf16 = self.cfg.precision == "bf16"
        self.read: set[str] = set()
        self.progress = bar(sum(r["bytes"] for r in self.meta["files"].values()), f"reading {self.step.name}")

    def load(self, rel: str) -> Any:
        """A file of the step, verified, on the CPU."""
        data = read_verified(self.step / rel, self.meta["files"].get(rel), fix=_FIX)
        if rel not in self.read:
            self.progress.update(self.meta["files"].get(rel, {}).get("bytes", 0))
        self.read.add(rel)
        return data

    def verify_rest(self) -> None:
        """Check the files nothing was read from (e.g. the weights a ZeRO checkpoint also keeps as fp32 masters)."""
        for rel, record in self.meta["files"].items():
            path = self.step / rel
            if rel not in self.read and (not path.is_file() or file_record(path) != record):
                raise CheckpointError(f"checkpoint file {path} is damaged or missing (not the bytes meta.json "
                                      f"recorded): {_FIX}")
            self.progress.update(record["bytes"] if rel not in self.read else 0)
        self.progress.close()

    def rank(self, tp: int, d: int, pp: int) -> int:
        """The global rank of (tp, data rank d = cp + CP * dp, pp) in megatron's and DeepSpeed's order."""
        return tp + self.tp * (d + self.data * pp)


def _flat_moments(state: dict, group: int, length: int) -> dict[str, Tensor]:
    """A group's AdamW moments (zeros before the first step, as `full_state` makes them for a fresh engine)."""
    moments = state["state"].get(group)
    if moments is None:
        return {m: torch.zeros(length) for m in MOMENTS}
    return {m: moments[m][:length] for m in MOMENTS}


def _optimizer_info(state: dict) -> dict:
    """The step count (torch's AdamW or apex's FusedAdam layout, see `optim_state`) and the groups' rates."""
    try:
        step = optim_state.step_count(state)
    except optim_state.OptimizerStateError as e:
        raise CheckpointError(f"{e}: {_FIX}") from None
    return {"steps": [step], "lrs": [float(g["lr"]) for g in state["param_groups"]]}


def _fragments(reader: _Reader, mp: int, wanted: set[str]) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """ZeRO-1/2 and DeepSpeed's bf16 optimizer: {category: {DeepSpeed name: whole flat tensor}}, optimizer info."""
    pieces: dict[str, dict[str, list[Tensor]]] = {c: defaultdict(list) for c in wanted}
    info = {}
    for d in range(reader.data):
        osd = reader.load(ds_files.optim_states(d, mp, bf16=reader.bf16))["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        info = _optimizer_info(base)
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            flat = {"weights": osd["single_partition_of_fp32_groups"][g],
                    **_flat_moments(base, g, osd["single_partition_of_fp32_groups"][g].numel())}
            for name, frag in mapping.items():
                for c in wanted:
                    pieces[c][name].append(flat[c][frag.start:frag.start + frag.numel].clone())
    return {c: {n: torch.cat(parts) for n, parts in by_name.items()} for c, by_name in pieces.items()}, info


def _zero3(reader: _Reader, mp: int, wanted: set[str]) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """ZeRO-3: each parameter's partitions, ceil(n / D) elements per data rank in parameter order, joined."""
    shapes = reader.load(ds_files.zero_model_states(0, mp))["param_shapes"]
    pieces: dict[str, dict[str, list[Tensor]]] = {c: defaultdict(list) for c in wanted}
    info = {}
    for d in range(reader.data):
        osd = reader.load(ds_files.optim_states(d, mp))["optimizer_state_dict"]
        base = osd["optimizer_state_dict"]
        info = _optimizer_info(base)
        for g, group_shapes in enumerate(shapes):
            flat = {"weights": osd["fp32_flat_groups"][g], **_flat_moments(base, g, osd["fp32_flat_groups"][g].numel())}
            offset = 0
            for name, shape in group_shapes.items():
                size = math.ceil(math.prod(shape) / reader.data)
                for c in wanted:
                    pieces[c][name].append(flat[c][offset:offset + size].clone())
                offset += size
    numels = {n: math.prod(s) for group in shapes for n, s in group.items()}
    joined = {c: {n: torch.cat(parts)[: numels[n]] for n, parts in by_name.items()} for c, by_name in pieces.items()}
    return joined, info


def _no_zero(reader: _Reader, stage: int, tp: int, names: list[str], wanted: set[str]) -> tuple[dict, dict]:
    """No ZeRO, fp32: the module's weights and torch's per-parameter AdamW state (ids in param-group order)."""
    mp = stage * reader.tp + tp if reader.pp > 1 else tp
    states = reader.load(ds_files.model_states(mp))
    if reader.pp > 1:
        weights = {}
        for index in sorted({int(n.split(".", 1)[0]) for n in names}):
            layer = reader.load(ds_files.layer_states(index, tp))
            weights.update({f"{index}.{k}": v for k, v in layer.items() if v is not None})
    else:
        weights = states["module"]
    optimizer = states["optimizer"]
    out: dict[str, dict[str, Tensor]] = {c: {} for c in wanted}
    # engine.build_optimizer: group 0 holds the matrices, group 1 the rest, each in module order
    ordered = [n for n in names if weights[n].dim() >= 2] + [n for n in names if weights[n].dim() < 2]
    ids = [i for g in optimizer["param_groups"] for i in g["params"]]
    for i, name in zip(ids, ordered, strict=True):
        if "weights" in wanted:
            out["weights"][name] = weights[name].float().flatten().clone()
        for m in set(MOMENTS) & wanted:
            state = optimizer["state"].get(i)
            out[m][name] = torch.zeros(weights[name].numel()) if state is None else state[m].flatten().clone()
    return out, _optimizer_info(optimizer)


def _ema(reader: _Reader, stage: int, tp: int) -> tuple[list[str], dict[str, Tensor], dict]:
    """(the shard's parameter names, {name: whole flat EMA}, data-rank-0's file) from the data ranks' EMA shards."""
    shards: list[dict] = []
    for d in range(reader.data):
        extra = reader.load(f"rank_{reader.rank(tp, d, stage):05d}.pt")
        if extra["ema"]["dp_size"] != reader.data or extra["ema"]["dp_rank"] != d:
            raise CheckpointError(f"{reader.step}: rank {reader.rank(tp, d, stage)}'s EMA shard is for data rank "
                                  f"{extra['ema']['dp_rank']}/{extra['ema']['dp_size']}, not {d}/{reader.data}")
        shards.append(extra)
    names, numels = shards[0]["param_names"], shards[0]["ema"]["numels"]
    offsets = [0]
    for n in numels:
        offsets.append(offsets[-1] + math.ceil(n / reader.data))
    ema = {}
    for i, (name, n) in enumerate(zip(names, numels, strict=True)):
        parts = []
        for d, extra in enumerate(shards):
            start, end = shard_bounds(n, d, reader.data)
            parts.append(extra["ema"]["shadow"][offsets[i]: offsets[i] + end - start])
        ema[name] = torch.cat(parts)
    first = {**shards[0], "ema": {k: v for k, v in shards[0]["ema"].items() if k != "shadow"}}  # counters only
    return names, ema, first


def read_state(step: str | Path, categories: tuple[str, ...] = TRAINING_CATEGORIES):
    """The whole training state of a step folder as a `full_state.FullState` (only `categories`' tensors)."""
    from sedd_scale.checkpoint import consolidated as cons
    from sedd_scale.checkpoint.full_state import FullState

    meta = read_meta(step)
    if meta["layout"] == ANY_LAYOUT:  # a resharded step: its state is a consolidated directory
        ckpt = cons.open_consolidated(Path(step) / "state")
        if ckpt.has_training_state:
            tensors, counters = ckpt.training_tensors(), ckpt.counters()
        else:  # weights only: a run starts from them (EMA = weights, step 0)
            tensors = {"weights": ckpt.weights(), "ema": ckpt.weights()}
            counters = {"step": meta["step"], "tokens_seen": 0, "layout": ANY_LAYOUT}
            if set(categories) - set(tensors):
                raise CheckpointError(f"{step} holds weights only, no {sorted(set(categories) - set(tensors))}")
        return FullState({c: dict(tensors[c]) for c in categories}, counters)
    reader = _Reader(step)
    cfg, kinds = reader.cfg, model_kinds(reader.cfg)
    wanted = set(categories) - {"ema"}
    parts: dict[str, dict[str, list[Tensor]]] = {c: defaultdict(lambda: [None] * reader.tp) for c in categories}
    infos, first = [], None
    for stage in range(reader.pp):
        for tp in range(reader.tp):
            names, ema, extra = _ema(reader, stage, tp)
            first = first or extra
            mp = stage * reader.tp + tp if reader.pp > 1 else tp
            if not wanted:
                tensors, info = {}, None
            elif reader.zero == 3:
                tensors, info = _zero3(reader, mp, wanted)
            elif reader.zero in (1, 2) or reader.bf16:
                tensors, info = _fragments(reader, mp, wanted)
            else:
                tensors, info = _no_zero(reader, stage, tp, names, wanted)
            if info:
                infos.append(info)
            tensors = {**tensors, **({"ema": ema} if "ema" in categories else {})}
            shapes = _local_shapes(cfg, kinds, reader.tp, tp, names, reader.pp > 1)
            for c in categories:
                missing = sorted(set(names) - set(tensors[c]))
                if missing:
                    raise CheckpointError(f"{reader.step}: no {c} found for {missing} (pp stage {stage}, tp {tp})")
                for name in names:
                    key = ds_files.model_key(name, cfg.n_blocks, reader.pp > 1)
                    parts[c][key][tp] = tensors[c][name].float().view(shapes[name])
    reader.verify_rest()  # a conversion refuses a damaged checkpoint even where it did not need the file
    full: dict[str, dict[str, Tensor]] = {c: {} for c in parts}
    for c, d in parts.items():  # each key's TP shards are dropped once joined: peak ~ the state, not twice it
        for k in sorted(d):
            full[c][k] = unshard_tensors(d.pop(k), kinds[k], cfg).contiguous()
    missing = sorted(set(kinds) - set(next(iter(full.values()))))
    if missing:
        raise CheckpointError(f"{reader.step}: no pipeline stage holds {missing}")
    return FullState(full, _counters(reader, first, infos))


def _local_shapes(cfg, kinds: dict[str, str], tp_size: int, tp: int, names: list[str], pipelined: bool) -> dict:
    """The TP-local shape of each of a shard's parameters (from the whole shapes and the split rules)."""
    from sedd_scale.checkpoint.consolidated import expected_shapes
    from sedd_scale.checkpoint.hub import shard_tensor

    whole = expected_shapes(cfg)
    out = {}
    for name in names:
        key = ds_files.model_key(name, cfg.n_blocks, pipelined)
        out[name] = shard_tensor(torch.empty(whole[key], device="meta"), kinds[key], cfg, tp, tp_size).shape
    return out


def _counters(reader: _Reader, extra: dict, infos: list[dict]) -> dict[str, Any]:
    """What `full_state.counters` records, from rank 0's file and the optimizer states."""
    steps = {s for info in infos for s in info["steps"]}
    if len(steps) > 1:
        raise CheckpointError(f"{reader.step}: AdamW's step differs between parameter groups ({sorted(steps)})")
    states = reader.load(ds_files.model_states(0) if reader.zero != 3 else ds_files.zero_model_states(0, 0))
    return {"step": extra["step"], "tokens_seen": extra["tokens_seen"], "skipped_total": extra["skipped_total"],
            "optimizer_step": int(steps.pop()) if steps else 0, "lrs": infos[0]["lrs"] if infos else [],
            "lr_scheduler": states["lr_scheduler"], "ema_num_updates": extra["ema"]["num_updates"],
            "loader": extra["loader"], "rng": {k: extra["rng"][k] for k in ("torch", "python", "numpy")},
            "layout": dict(reader.meta["layout"])}
