"""The libraries behind `tools/`: checkpoint conversion and sampling (evaluation is `diffusion/evaluation.py`)."""
