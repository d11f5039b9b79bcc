"""Checkpoint formats: `hub` (the reference's config.json + model.safetensors) and `sharded` (training runs).

Submodules are imported explicitly (`from sedd_scale.checkpoint.hub import save_hub`), so reading a
training checkpoint's metadata does not import megatron-core.
"""
