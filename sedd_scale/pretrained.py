"""`load_pretrained`: a hub-format or consolidated checkpoint as a ready (model, graph, noise) triple."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sedd_scale import parallel
from sedd_scale.checkpoint import consolidated
from sedd_scale.checkpoint.hub import HubFormatError, load_hub_state, load_weights, model_config_from_hub, read_hub
from sedd_scale.diffusion import Graph, get_graph, get_noise
from sedd_scale.diffusion.noise import Noise
from sedd_scale.model.transformer import SEDD


def load_pretrained(path: str | Path, tp_size: int = 1, *, device: torch.device | str | None = None,
                    **config_overrides) -> tuple[SEDD, Graph, Noise]:
    """Load a checkpoint directory into a SEDD split over `tp_size` ranks: the reference's hub format
    (config.json + model.safetensors) or our consolidated format (tools/convert_checkpoint.py).

    Call it on every rank of the TP group; a lone process with tp_size=1 needs no launcher. The
    model is in eval mode; `model(indices, total_noise)` returns this rank's vocabulary shard of
    the log-scores (`sedd_scale.parallel.gather_tp` joins the shards). `config_overrides` set
    ModelConfig fields the file does not fix, e.g. precision="bf16-mixed", vocab_multiple=1.
    """
    if (Path(path) / "meta.json").is_file() or (Path(path) / "latest").is_file():
        raise HubFormatError(f"{path} is a sharded training checkpoint: consolidate it first "
                             f"(python tools/convert_checkpoint.py consolidate {path} OUT --weights ema)")
    if consolidated.is_consolidated(path):
        ckpt = consolidated.open_consolidated(path)
        cfg = dataclasses.replace(ckpt.model, **config_overrides)
        noise_cfg = ckpt.noise
        kind = noise_cfg.pop("type")
        noise = get_noise(kind, **noise_cfg)
        parallel.init_parallel(tp=tp_size)
        model = SEDD(cfg, device="cpu")
        load_weights(model, dict(ckpt.weights()))
    else:
        hub_cfg, state = read_hub(path)
        cfg = model_config_from_hub(hub_cfg, **config_overrides)
        parallel.init_parallel(tp=tp_size)
        noise_cfg = dict(hub_cfg.get("noise") or {})
        kind = noise_cfg.pop("type", None)
        if kind is None:
            raise HubFormatError(f"{path}/config.json lacks noise.type (the reference's load_model_hf reads it)")
        # The reference's loglinear schedule ignores sigma_min/max (eps is fixed at 1e-3).
        noise = get_noise(kind) if kind == "loglinear" else get_noise(
            kind, **{k: float(noise_cfg[k]) for k in ("sigma_min", "sigma_max") if k in noise_cfg})
        model = SEDD(cfg, device="cpu")
        load_hub_state(model, state)
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), get_graph(cfg.graph, cfg.num_tokens), noise
