"""Samplers selectable by name (`tools/sample.py --sampler`, `train.sampler`, `generation.generate_batches`).

The registry and its spec syntax are in `registry.py`; each module below registers its samplers, and a
new sampler is one module plus one import line here.
"""
from . import block, cached, confidence, tau_leaping  # noqa: F401  (each registers its samplers)
from .registry import SAMPLERS, NFECounter, Sampled, Sampler, build_sampler, parse_sampler, sampler

__all__ = ["SAMPLERS", "NFECounter", "Sampled", "Sampler", "build_sampler", "parse_sampler", "sampler"]
