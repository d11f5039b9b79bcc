"""Token data: tokenizers, built-in corpora, packing, tar shards with a manifest, and the loaders.

Prepare data with `tools/prepare_data.py` (or point a manifest at a Megatron indexed dataset with its
`--from-megatron`, `indexed.py`; prompt/response pairs for fine-tuning with its `--pairs`, `pairs.py`); train with `TokenLoader(LoaderConfig(...), dp_rank,
dp_size)`; evaluate with `EvalLoader(manifest, "valid" | "test", micro_batch, dp_rank, dp_size)`.
At scale, rank 0 runs `check_sources(config)` / `check_split(manifest, split)` and shares the
result (`checked=`), so the other ranks do no per-shard metadata work at start.
"""
import importlib

# name -> submodule. Loaded on first use, so that importing a light submodule (manifest, tokenizer, prepare: what
# tools/prepare_data.py needs) does not load torch along with the loaders.
_EXPORTS = {"CheckedSplit": "checked", "check_split": "checked", "EvalBatch": "loader", "EvalLoader": "loader",
            "LoaderConfig": "loader", "TokenLoader": "loader", "check_sources": "loader", "Manifest": "manifest",
            "ManifestError": "manifest", "ShardError": "shards", "get_tokenizer": "tokenizer",
            "tokenizer_vocab_size": "tokenizer", "UrlError": "urlcache"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """The exported names, imported from their submodule on first use."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sedd_scale.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sedd_scale.data' has no attribute {name!r}")
