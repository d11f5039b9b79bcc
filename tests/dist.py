"""Run a test function in N real processes joined by a gloo process group (CPU), collect results."""
from sedd_scale.testing.spawn import launch

__all__ = ["launch"]
