"""Weights-only checkpoints (the reference's hub format, our consolidated format): `read_weights` reads one
into memory, `load_pretrained` makes it a ready (model, graph, noise) triple."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sedd_scale.checkpoint import consolidated
from sedd_scale.checkpoint.hub import (
    HubFormatError,
    hub_to_model,
    load_weights,
    model_config_from_hub,
    noise_from_hub,
    read_hub,
)
from sedd_scale.diffusion import Graph, get_graph, get_noise
from sedd_scale.diffusion.noise import Noise
from sedd_scale.distributed import parallel
from sedd_scale.model.config import ModelConfig
from sedd_scale.model.transformer import SEDD


@dataclasses.dataclass
class Weights:
    """A weights-only checkpoint: model config, noise spec ({"type", **get_noise kwargs}), whole tensors by
    model key, the training recipe it came from and its optimizer step (consolidated checkpoints of our runs; None
    for hub ones)."""

    config: ModelConfig
    noise: dict[str, Any]
    tensors: Mapping[str, Tensor]
    recipe: dict[str, Any] | None
    step: int | None = None


def read_weights(path: str | Path, *, group=None, **config_overrides) -> Weights:
    """Read a hub or consolidated directory (strictly checked); `config_overrides` set ModelConfig fields
    the file does not fix, e.g. precision="bf16-mixed", vocab_multiple=1.

    In a process group of several ranks it is a collective: call it on every rank of `group` (default: all); one of
    them hashes the files and every rank raises its verdict (1,024 ranks each hashing a 7B model's 27.8 GB would read
    28.5 TB from shared storage)."""
    path = Path(path)
    if (path / "meta.json").is_file() or (path / "latest").is_file():
        raise HubFormatError(f"{path} is a sharded training checkpoint: consolidate it first "
                             f"(python tools/convert_checkpoint.py consolidate {path} OUT --weights ema)")
    if consolidated.is_consolidated(path):
        ckpt = consolidated.open_consolidated(path, collective=True, group=group)
        return Weights(dataclasses.replace(ckpt.model, **config_overrides), ckpt.noise, ckpt.weights(),
                       ckpt.config.get("recipe"), ckpt.config.get("step"))
    hub_cfg, state = read_hub(path, collective=True, group=group)
    cfg = model_config_from_hub(hub_cfg, **config_overrides)
    return Weights(cfg, noise_from_hub(hub_cfg), hub_to_model(cfg, state), None)


def load_pretrained(path: str | Path, tp_size: int = 1, *, device: torch.device | str | None = None,
                    **config_overrides) -> tuple[SEDD, Graph, Noise]:
    """Load a checkpoint directory into a SEDD split over `tp_size` ranks: the reference's hub format
    (config.json + model.safetensors) or our consolidated format (tools/convert_checkpoint.py).

    Call it on every rank of the TP group; a lone process with tp_size=1 needs no launcher. The model
    goes to `device` (default: this rank's GPU, LOCAL_RANK modulo the visible ones, else the CPU) in eval mode;
    `model(indices, total_noise)` returns this rank's vocabulary shard of the log-scores
    (`sedd_scale.distributed.parallel.gather_tp` joins the shards). `config_overrides` as in `read_weights`.
    """
    device = torch.device(device) if device is not None else parallel.local_device()
    if device.type == "cuda":  # each TP rank on its own GPU (before the process group picks one)
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched: join first, so one rank hashes the files, not each
        parallel.join_process_group()
    weights = read_weights(path, **config_overrides)
    cfg, spec = weights.config, dict(weights.noise)
    parallel.init_model_parallel(tp=tp_size)
    model = SEDD(cfg, device="cpu")
    load_weights(model, dict(weights.tensors))
    return model.to(device).eval(), get_graph(cfg.graph, cfg.num_tokens), get_noise(spec.pop("type"), **spec)
