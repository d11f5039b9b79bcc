"""`load_pretrained`: a reference-format hub checkpoint as a ready (model, graph, noise) triple."""
from __future__ import annotations

from pathlib import Path

import torch

from sedd_scale import parallel
from sedd_scale.checkpoint.hub import HubFormatError, load_hub_state, model_config_from_hub, read_hub
from sedd_scale.diffusion import Graph, get_graph, get_noise
from sedd_scale.diffusion.noise import Noise
from sedd_scale.model.transformer import SEDD


def load_pretrained(path: str | Path, tp_size: int = 1, *, device: torch.device | str | None = None,
                    **config_overrides) -> tuple[SEDD, Graph, Noise]:
    """Load a hub directory (config.json + model.safetensors) into a SEDD split over `tp_size` ranks.

    Call it on every rank of the TP group; a lone process with tp_size=1 needs no launcher. The
    model is in eval mode; `model(indices, total_noise)` returns this rank's vocabulary shard of
    the log-scores (`sedd_scale.parallel.gather_tp` joins the shards). `config_overrides` set
    ModelConfig fields the hub format does not carry, e.g. precision="bf16-mixed", vocab_multiple=1.
    """
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
