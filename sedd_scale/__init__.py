"""sedd-scale: Score Entropy Discrete Diffusion language models at any scale."""
