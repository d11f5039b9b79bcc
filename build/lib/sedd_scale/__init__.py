"""sedd-scale: Score Entropy Discrete Diffusion language models at any scale."""


def __getattr__(name: str):
    # Lazy, so `import sedd_scale` stays light (megatron-core loads only when a model is needed).
    if name == "load_pretrained":
        from sedd_scale.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'sedd_scale' has no attribute {name!r}")
