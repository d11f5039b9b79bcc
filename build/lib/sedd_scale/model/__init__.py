"""The SEDD transformer (megatron-core tensor-parallel layers) and its configuration.

The network classes load lazily: a recipe needs only `ModelConfig`, not megatron-core.
"""
from .config import PRESETS, ModelConfig, preset

_NETWORK = ("SEDD", "Block", "InputLayer", "OutputLayer")
__all__ = ["PRESETS", "ModelConfig", "preset", *_NETWORK]


def __getattr__(name: str):
    if name in _NETWORK:
        from . import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'sedd_scale.model' has no attribute {name!r}")
