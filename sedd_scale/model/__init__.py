"""The SEDD transformer (megatron-core tensor-parallel layers) and its configuration."""
from .config import PRESETS, ModelConfig, preset
from .transformer import SEDD, Block, InputLayer, OutputLayer

__all__ = ["PRESETS", "SEDD", "Block", "InputLayer", "ModelConfig", "OutputLayer", "preset"]
