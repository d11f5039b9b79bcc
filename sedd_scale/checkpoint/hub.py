"""The reference's hub checkpoint format (sedd-math section 7) <-> `SEDD` at any TP size, strictly.

A hub directory holds `config.json` (the reference's nested hydra config) and `model.safetensors`
(the reference module's full, unsharded `state_dict`). Loading slices every tensor for this TP
rank (padding the vocabulary, regrouping qkv rows by heads); export gathers the shards back. Any
missing, unexpected or mis-shaped key is an error that lists all of them. The TP split rules
(`model_kinds`, `shard_tensor`, `gather_tp_tensor`) also serve our consolidated format and resharding.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import Tensor

from sedd_scale.checkpoint import bundle
from sedd_scale.checkpoint.safetensors_shards import (
    DEFAULT_SHARD_BYTES,
    INDEX_FILE,
    WEIGHTS_FILE,
    Weights,
    WeightsError,
    has_weights,
    weight_files,
    write_weights,
)
from sedd_scale.checksums import SUMS_FILE, ChecksumError, once, read_sums, verify_sums, write_sums
from sedd_scale.diffusion.noise import GeometricNoise
from sedd_scale.model import rotary
from sedd_scale.model.config import SIGMA_FEATURES, ModelConfig

# The format needs no megatron-core (input checks read config.json cheaply): the functions on TP-sharded
# models import `sedd_scale.distributed.parallel` when called.
if TYPE_CHECKING:
    from sedd_scale.model.transformer import SEDD

CONFIG_FILE = "config.json"
INV_FREQ = "rotary_emb.inv_freq"  # a buffer derived from the config: checked on load, recomputed on export

# How a hub tensor is split over TP ranks. "rep": replicated; "vocab": rows of the padded vocabulary;
# "rows": output features (column-parallel); "cols": input features (row-parallel); "qkv": rows
# regrouped so rank r holds [q | k | v] of its own heads.
_TOP = {
    "vocab_embed.embedding": ("input_layer.vocab_embed.weight", "vocab"),
    "sigma_map.mlp.0.weight": ("input_layer.sigma_map.mlp.0.weight", "rep"),
    "sigma_map.mlp.0.bias": ("input_layer.sigma_map.mlp.0.bias", "rep"),
    "sigma_map.mlp.2.weight": ("input_layer.sigma_map.mlp.2.weight", "rep"),
    "sigma_map.mlp.2.bias": ("input_layer.sigma_map.mlp.2.bias", "rep"),
    "output_layer.norm_final.weight": ("output_layer.norm_final.weight", "rep"),
    "output_layer.adaLN_modulation.weight": ("output_layer.adaLN_modulation.weight", "rep"),
    "output_layer.adaLN_modulation.bias": ("output_layer.adaLN_modulation.bias", "rep"),
    "output_layer.linear.weight": ("output_layer.linear.weight", "vocab"),
    "output_layer.linear.bias": ("output_layer.linear.bias", "vocab"),
}
_BLOCK = {
    "norm1.weight": ("norm1.weight", "rep"),
    "attn_qkv.weight": ("attn_qkv.weight", "qkv"),
    "attn_out.weight": ("attn_out.weight", "cols"),
    "norm2.weight": ("norm2.weight", "rep"),
    "mlp.0.weight": ("mlp_in.weight", "rows"),
    "mlp.0.bias": ("mlp_in.bias", "rows"),
    "mlp.2.weight": ("mlp_out.weight", "cols"),
    "mlp.2.bias": ("mlp_out.bias", "rep"),
    "adaLN_modulation.weight": ("adaLN_modulation.weight", "rep"),
    "adaLN_modulation.bias": ("adaLN_modulation.bias", "rep"),
}


class HubFormatError(ValueError):
    """A hub checkpoint that does not fit the model: the message lists every offending key."""


def key_map(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """hub key -> (model key, split kind) for every learned tensor."""
    out = dict(_TOP)
    for i in range(cfg.n_blocks):
        out.update({f"blocks.{i}.{k}": (f"blocks.{i}.{m}", kind) for k, (m, kind) in _BLOCK.items()})
    return out


def hub_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The reference module's state-dict shapes for this config (unpadded vocabulary)."""
    h, c, v, f = cfg.hidden_size, cfg.cond_dim, cfg.vocab_size, cfg.mlp_ratio * cfg.hidden_size
    top = {"vocab_embed.embedding": (v, h), "sigma_map.mlp.0.weight": (c, SIGMA_FEATURES), "sigma_map.mlp.0.bias": (c,),
           "sigma_map.mlp.2.weight": (c, c), "sigma_map.mlp.2.bias": (c,), INV_FREQ: (cfg.head_dim // 2,),
           "output_layer.norm_final.weight": (h,), "output_layer.adaLN_modulation.weight": (2 * h, c),
           "output_layer.adaLN_modulation.bias": (2 * h,), "output_layer.linear.weight": (v, h),
           "output_layer.linear.bias": (v,)}
    block = {"norm1.weight": (h,), "attn_qkv.weight": (3 * h, h), "attn_out.weight": (h, h), "norm2.weight": (h,),
             "mlp.0.weight": (f, h), "mlp.0.bias": (f,), "mlp.2.weight": (h, f), "mlp.2.bias": (h,),
             "adaLN_modulation.weight": (6 * h, c), "adaLN_modulation.bias": (6 * h,)}
    for i in range(cfg.n_blocks):
        top.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    return top


# ---------------------------------------------------------------------------------------------
# config.json
def model_config_from_hub(hub: dict[str, Any], **overrides) -> ModelConfig:
    """ModelConfig from the reference's nested config dict (keys it reads: tokens, graph.type, model.*)."""
    wanted = ["tokens", "graph.type"] + [f"model.{k}" for k in ("hidden_size", "cond_dim", "n_blocks", "n_heads",
                                                                  "dropout", "scale_by_sigma")]
    values, missing = {}, []
    for path in wanted:
        node = hub
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        (missing.append(path) if node is None else values.__setitem__(path, node))
    if missing:
        raise HubFormatError(f"config.json lacks {missing} (the reference SEDD reads them)")
    model = hub["model"]
    fields = dict(num_tokens=values["tokens"], graph=values["graph.type"], hidden_size=values["model.hidden_size"],
                  cond_dim=values["model.cond_dim"], n_blocks=values["model.n_blocks"],
                  n_heads=values["model.n_heads"], dropout=float(values["model.dropout"]),
                  scale_by_sigma=bool(values["model.scale_by_sigma"]), name=str(model.get("name", "custom")))
    if "length" in model:
        fields["length"] = model["length"]
    if "parametrization" in model:  # ours (absent: the reference's log-ratios)
        fields["parametrization"] = str(model["parametrization"])
    return ModelConfig(**{**fields, **overrides})


# The sections of the reference's configs/config.yaml that its network does not read, with its
# defaults; `hub_config` writes them so an exported config.json has the reference's key set.
REFERENCE_SECTIONS: dict[str, Any] = {
    "ngpus": 8,
    "training": {"batch_size": 512, "accum": 1, "n_iters": 1300001, "snapshot_freq": 50000, "log_freq": 50,
                 "eval_freq": 100, "snapshot_freq_for_preemption": 10000, "weight": "standard",
                 "snapshot_sampling": True, "ema": 0.9999},
    "data": {"train": "openwebtext", "valid": "wikitext103", "cache_dir": "data"},
    "graph": {"file": "data", "report_all": False},
    "noise": {"type": "loglinear", "sigma_min": 0.0001, "sigma_max": 20},
    "sampling": {"predictor": "euler", "steps": 128, "noise_removal": True},
    "eval": {"batch_size": 512, "perplexity": True, "perplexity_batch_size": 32},
    "optim": {"weight_decay": 0, "optimizer": "AdamW", "lr": 0.0003, "beta1": 0.9, "beta2": 0.999, "eps": 1e-08,
              "warmup": 2500, "grad_clip": 1.0},
}
_ORDER = ("ngpus", "tokens", "training", "data", "graph", "noise", "sampling", "eval", "optim", "model")


def hub_config(cfg: ModelConfig, *, noise: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The reference's config dict for `cfg`: `base` (default: the reference's defaults; e.g. a loaded
    config.json) with the keys the reference reads set from `cfg` and `noise` (its noise section,
    e.g. {"type": "geometric", "sigma_min": 1e-4, "sigma_max": 20})."""
    out = json.loads(json.dumps(REFERENCE_SECTIONS if base is None else base))  # a deep copy
    out["tokens"] = cfg.num_tokens
    out["graph"] = {"type": cfg.graph, **{k: v for k, v in out.get("graph", {}).items() if k != "type"}}
    out["noise"] = {**out.get("noise", {}), **noise}
    model = out.get("model", {})
    out["model"] = {**model, "name": cfg.name, "type": model.get("type", "ddit"), "hidden_size": cfg.hidden_size,
                    "cond_dim": cfg.cond_dim, "length": cfg.length, "n_blocks": cfg.n_blocks, "n_heads": cfg.n_heads,
                    "scale_by_sigma": cfg.scale_by_sigma, "dropout": cfg.dropout}
    # The reference knows only log-ratio outputs; a denoiser's logits are marked (our loaders read the key; the
    # reference's would take them for log-ratios).
    out["model"].pop("parametrization", None)
    if cfg.parametrization != "ratios":
        out["model"]["parametrization"] = cfg.parametrization
    return {**{k: out[k] for k in _ORDER if k in out}, **out}


# The sections only the reference's training reads; an export states them from its own run or leaves them out.
TRAINING_SECTIONS = ("ngpus", "training", "data", "eval", "optim")


def exported_hub_config(cfg: ModelConfig, *, noise: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """The hub config.json of a model of ours: what the model is, and how it was trained where that is known.

    A model trained here (`provenance` holds its recipe and counters) gets the reference's training sections filled
    from its own run; one converted from a hub keeps that hub's config; otherwise the training sections are left
    out rather than carrying the reference's defaults (8 GPUs, OpenWebText, 1.3M steps) as if they were true.
    """
    if "hub_config" in provenance:
        return hub_config(cfg, noise=noise, base=provenance["hub_config"])
    out = hub_config(cfg, noise=noise)
    for key in TRAINING_SECTIONS:
        out.pop(key)
    recipe, layout = provenance.get("recipe"), provenance.get("layout")
    if not recipe:
        return out
    from sedd_scale.config import Recipe, from_dict, to_dict  # keeps config.json checks free of the recipe module

    recipe = to_dict(from_dict(Recipe, recipe))  # as recorded, with the defaults it left out
    train, parallel, optim, data = recipe["train"], recipe["parallel"], recipe["optim"], recipe["data"]
    world = layout["tp"] * layout["pp"] * layout["dp"] if isinstance(layout, dict) else None
    known = {
        "ngpus": world,
        "training": {"batch_size": parallel["global_batch"], "n_iters": provenance.get("step"),
                     "tokens_seen": provenance.get("tokens_seen"), "snapshot_freq": train["save_every"],
                     "log_freq": train["log_every"], "eval_freq": train["eval_every"], "ema": train["ema"]},
        "data": {"train": data["manifests"], "valid": data["valid"] or data["manifests"][0],
                 "tokenizer": data["tokenizer"]},
        "optim": {"weight_decay": optim["weight_decay"], "optimizer": "AdamW", "lr": optim["lr"],
                  "beta1": optim["betas"][0], "beta2": optim["betas"][1], "eps": optim["eps"],
                  "warmup": optim["warmup"], "grad_clip": optim["grad_clip"]},
    }
    return {**{k: known.get(k, out.get(k)) for k in _ORDER if k in known or k in out}, **out}


def noise_from_hub(config: dict[str, Any]) -> dict[str, Any]:
    """Our noise spec ({"type", **get_noise kwargs}) for a hub config.json's noise section.

    The reference's loglinear schedule ignores sigma_min/max (its eps is fixed at 1e-3); geometric reads them
    (absent ones take the schedule's defaults).
    """
    noise = config.get("noise") or {}
    kind = noise.get("type")
    if kind == "loglinear":
        return {"type": "loglinear", "eps": 1e-3}
    if kind == "geometric":
        default = GeometricNoise()
        return {"type": "geometric", "sigma_min": float(noise.get("sigma_min", default.sigma_min)),
                "sigma_max": float(noise.get("sigma_max", default.sigma_max))}
    raise HubFormatError(f"config.json noise.type is {kind!r}: the reference's load_model_hf reads loglinear or "
                         "geometric")


def noise_to_hub(spec: dict[str, Any]) -> dict[str, Any]:
    """The hub config's noise section for our noise spec; a schedule the reference cannot express is an error."""
    if spec["type"] == "loglinear":
        if spec["eps"] != 1e-3:
            raise HubFormatError(f"the reference's loglinear schedule fixes eps = 1e-3; this model used {spec['eps']}")
        return {"type": "loglinear"}
    return {"type": "geometric", "sigma_min": spec["sigma_min"], "sigma_max": spec["sigma_max"]}


def read_hub(path: str | Path, *, collective: bool = False, group=None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config dict, full state dict) of a hub checkpoint directory (one weights file or shards with an index),
    checked against its SHA256SUMS first when it has one (and said so on stderr when it has none).

    `collective`: every rank of `group` (default: all) reads it together, and one of them hashes the files
    (`checksums.once`); otherwise this process hashes them itself."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not has_weights(path):
        raise FileNotFoundError(f"hub checkpoint {str(path)!r} lacks {CONFIG_FILE} or its weights (a directory with "
                                f"{CONFIG_FILE} and {WEIGHTS_FILE}, or its shards and {INDEX_FILE}, is expected)")
    first = [CONFIG_FILE, WEIGHTS_FILE if (path / WEIGHTS_FILE).is_file() else INDEX_FILE]
    verified = (path / SUMS_FILE).is_file()

    def check() -> None:
        if verify_sums(path, required=False):  # every file it lists: weights, tokenizer, model card
            listed = read_sums(path)  # and it must list the config and every weights file (the index names them)
            verify_sums(path, [f for f in (*first, *weight_files(path)) if f not in listed])  # raises naming one

    try:  # SHA256SUMS (our exports) catches damage before anything is parsed; one written elsewhere may have none
        once(check, (ChecksumError, WeightsError), group) if collective else check()
        config = _parse_config(path / CONFIG_FILE)
        weights = Weights(path)
        state = {k: weights[k] for k in weights}
    except (ChecksumError, WeightsError) as e:
        raise HubFormatError(str(e)) from None
    except SafetensorError as e:
        raise HubFormatError(f"the weights of {path} are not readable safetensors ({e}): the hub checkpoint is "
                             "damaged; copy it again from the source") from None
    if not verified:
        note_unverified(path)
    return config, state


def read_hub_config(path: str | Path) -> dict[str, Any]:
    """A hub directory's config.json, checked against its SHA256SUMS (when it has one) before it is parsed."""
    path = Path(path)
    try:
        verify_sums(path, [CONFIG_FILE], required=False)
    except ChecksumError as e:
        raise HubFormatError(str(e)) from None
    return _parse_config(path / CONFIG_FILE)


def _parse_config(path: Path) -> dict[str, Any]:
    try:  # checked bytes parse; without SHA256SUMS, damage shows only here
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HubFormatError(f"{path} is not valid JSON ({e}): the hub checkpoint is damaged; copy it again from "
                             "the source") from None
    if not isinstance(config, dict):
        raise HubFormatError(f"{path} holds a JSON {type(config).__name__}, not the reference's config object")
    return config


def note_unverified(path: Path) -> None:
    """Say (on rank 0 only) that a hub directory without SHA256SUMS is used unverified."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"note: {path} has no {SUMS_FILE} (e.g. the reference's own hub format), so its files were not "
              "verified", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Tensors
def check_hub_state(cfg: ModelConfig, state: dict[str, Tensor]) -> None:
    """Raise HubFormatError listing missing, unexpected and mis-shaped keys, or a foreign rotary buffer."""
    shapes = hub_shapes(cfg)
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = sorted(f"{k}: {tuple(state[k].shape)} (expected {shapes[k]})"
                   for k in set(shapes) & set(state) if tuple(state[k].shape) != shapes[k])
    problems = [f"{name} ({len(keys)}): {keys}" for name, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", wrong)) if keys]
    if problems:
        raise HubFormatError(f"hub state dict does not fit {cfg.name!r} ({cfg.n_blocks} blocks x "
                             f"{cfg.hidden_size}, vocab {cfg.vocab_size}):\n  " + "\n  ".join(problems))
    expected = rotary.inv_freq(cfg.head_dim, cfg.rotary_base)
    if not torch.equal(state[INV_FREQ].float(), expected):
        raise HubFormatError(f"{INV_FREQ} differs from 1/base^(2k/D) with base={cfg.rotary_base}: "
                             "set ModelConfig.rotary_base to the checkpoint's base")


def model_kinds(cfg: ModelConfig) -> dict[str, str]:
    """model key (the TP=1 `SEDD` parameter name) -> how it splits over TP ranks, for every learned tensor."""
    return {mkey: kind for mkey, kind in key_map(cfg).values()}


def shard_tensor(t: Tensor, kind: str, cfg: ModelConfig, rank: int, tp: int) -> Tensor:
    """TP rank `rank`'s slice of a whole (unpadded) tensor split as `kind`."""
    if kind == "rep":
        return t
    if kind == "vocab":
        pad = cfg.padded_vocab(tp) - t.shape[0]
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
        return t.chunk(tp, 0)[rank]
    if kind == "rows":
        return t.chunk(tp, 0)[rank]
    if kind == "cols":
        return t.chunk(tp, 1)[rank]
    h = cfg.hidden_size  # qkv: (3H, H) as [q | k | v], heads contiguous within each
    return t.view(3, tp, h // tp, h)[:, rank].reshape(3 * h // tp, h)


def unshard_tensors(parts: list[Tensor], kind: str, cfg: ModelConfig) -> Tensor:
    """The whole (unpadded) tensor from every TP rank's slice, in rank order."""
    if kind == "rep":
        return parts[0]
    if kind == "vocab":
        return torch.cat(parts, 0)[: cfg.vocab_size]
    if kind == "rows":
        return torch.cat(parts, 0)
    if kind == "cols":
        return torch.cat(parts, 1)
    h, tp = cfg.hidden_size, len(parts)
    return torch.stack([p.view(3, h // tp, h) for p in parts], 1).reshape(3 * h, h)


def hub_to_model(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A full hub state dict (checked first) renamed to model keys, whole tensors (no TP split)."""
    check_hub_state(cfg, state)
    return {mkey: state[hkey] for hkey, (mkey, _) in key_map(cfg).items()}


def model_to_hub(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Whole model-keyed tensors renamed to the hub's keys, with the rotary buffer the reference saves."""
    missing = sorted(set(model_kinds(cfg)) - set(state))
    if missing:
        raise HubFormatError(f"state lacks {len(missing)} model tensors: {missing}")
    out = {hkey: state[mkey] for hkey, (mkey, _) in key_map(cfg).items()}
    out[INV_FREQ] = rotary.inv_freq(cfg.head_dim, cfg.rotary_base)
    return dict(sorted(out.items()))


def load_weights(model: SEDD, state: dict[str, Tensor]) -> None:
    """Load whole model-keyed tensors into this TP rank's shards (strict: every parameter is set once)."""
    from sedd_scale.distributed import parallel

    cfg, rank, tp = model.config, parallel.tp_rank(), parallel.tp_size()
    kinds = model_kinds(cfg)
    params = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if set(params) != set(kinds) or set(state) != set(kinds):  # another config or a changed module layout
        raise HubFormatError(f"model keys without a tensor: {sorted(set(params) - set(state))}; "
                             f"tensors without a model key: {sorted(set(state) - set(params))}")
    local = {k: shard_tensor(state[k], kinds[k], cfg, rank, tp) for k in params}
    bad = [f"{k}: {tuple(local[k].shape)} vs model {tuple(p.shape)}" for k, p in params.items()
           if local[k].shape != p.shape]
    if bad:
        raise HubFormatError(f"shard shapes differ from the model's: {bad}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(local[k])


def gather_weights(model: SEDD, values: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Whole model-keyed tensors (float32, CPU) gathered from all TP ranks; a collective over the TP group.

    `values` (model key -> local tensor) gathers other per-parameter tensors instead, e.g. gradients.
    """
    params = model.state_dict() if values is None else values
    return {k: gather_tp_tensor(params[k], kind, model.config) for k, kind in model_kinds(model.config).items()}


def gather_tp_tensor(local: Tensor, kind: str, cfg: ModelConfig) -> Tensor:
    """The whole tensor (float32, CPU) from this TP rank's slice `local` split as `kind`; a TP collective."""
    from sedd_scale.distributed import parallel

    local, tp = local.detach().float().contiguous(), parallel.tp_size()
    if kind == "rep" or tp == 1:
        return unshard_tensors([local], kind, cfg).cpu().clone()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local, group=parallel.tp_group())
    return unshard_tensors(parts, kind, cfg).cpu().contiguous()


def load_hub_state(model: SEDD, state: dict[str, Tensor]) -> None:
    """Load a full hub state dict into this rank's model shards (strict: every parameter is set)."""
    load_weights(model, hub_to_model(model.config, state))


def gather_hub_state(model: SEDD, values: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The full hub state dict (float32, CPU) gathered from all TP ranks; a collective over the TP group."""
    return model_to_hub(model.config, gather_weights(model, values))


def save_hub(model: SEDD, path: str | Path, config: dict[str, Any]) -> None:
    """Write `config` and the gathered weights as a hub directory (collective; TP rank 0 writes).

    `config` is the reference's config dict (see `hub_config`); its model keys must agree with the model.
    """
    derived = model_config_from_hub(config, precision=model.config.precision,
                                    vocab_multiple=model.config.vocab_multiple,
                                    rotary_base=model.config.rotary_base, mlp_ratio=model.config.mlp_ratio)
    keys = ("num_tokens", "graph", "hidden_size", "cond_dim", "n_blocks", "n_heads", "scale_by_sigma",
            "parametrization")
    differ = {k: (getattr(derived, k), getattr(model.config, k)) for k in keys
              if getattr(derived, k) != getattr(model.config, k)}
    if differ:
        raise HubFormatError(f"config disagrees with the model (config, model): {differ}; build it with hub_config()")
    from sedd_scale.distributed import parallel

    state = gather_hub_state(model)
    if parallel.tp_rank() == 0:
        write_hub(path, config, state)


def write_hub(path: str | Path, config: dict[str, Any], state: dict[str, Tensor], *,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, bundle_from: Path | None = None) -> Path:
    """Write a hub directory as the reference does: `config` as config.json, the full state dict as
    model.safetensors (above `max_shard_bytes`: shards and model.safetensors.index.json); with `bundle_from`, that
    export's tokenizer and model card beside them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_weights(state, path, max_shard_bytes=max_shard_bytes)
    if bundle_from is not None:
        bundle.copy_bundle(bundle_from, path)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    write_sums(path)  # beside the reference's two files; its loader ignores it
    return path
