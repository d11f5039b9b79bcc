"""Token data: tokenizers, built-in corpora, packing, tar shards with a manifest, and the loaders.

Prepare data with `tools/prepare_data.py`; train with `TokenLoader(LoaderConfig(...), dp_rank,
dp_size)`; evaluate with `EvalLoader(manifest, "valid" | "test", micro_batch, dp_rank, dp_size)`.
At scale, rank 0 runs `check_sources(config)` / `check_split(manifest, split)` and shares the
result (`checked=`), so the other ranks do no per-shard metadata work at start.
"""
from sedd_scale.data.checked import CheckedSplit, check_split
from sedd_scale.data.loader import EvalBatch, EvalLoader, LoaderConfig, TokenLoader, check_sources
from sedd_scale.data.manifest import Manifest, ManifestError
from sedd_scale.data.shards import ShardError
from sedd_scale.data.tokenizer import get_tokenizer, tokenizer_vocab_size
from sedd_scale.data.urlcache import UrlError

__all__ = ["CheckedSplit", "EvalBatch", "EvalLoader", "LoaderConfig", "Manifest", "ManifestError", "ShardError",
           "TokenLoader", "UrlError", "check_sources", "check_split", "get_tokenizer", "tokenizer_vocab_size"]
