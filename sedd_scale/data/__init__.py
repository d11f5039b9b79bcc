"""Token data: tokenizers, built-in corpora, packing, tar shards with a manifest, and the loaders.

Prepare data with `tools/prepare_data.py`; train with `TokenLoader(LoaderConfig(...), dp_rank,
dp_size)`; evaluate with `EvalLoader(manifest, "valid" | "test", micro_batch, dp_rank, dp_size)`.
"""
from sedd_scale.data.loader import EvalBatch, EvalLoader, LoaderConfig, TokenLoader
from sedd_scale.data.manifest import Manifest, ManifestError
from sedd_scale.data.shards import ShardError
from sedd_scale.data.tokenizer import get_tokenizer

__all__ = ["EvalBatch", "EvalLoader", "LoaderConfig", "Manifest", "ManifestError", "ShardError", "TokenLoader",
           "get_tokenizer"]
