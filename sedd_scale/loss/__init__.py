"""Losses computed where the model's tensors live: score entropy fused with the vocabulary-parallel head."""
from .vocab_parallel import ScoreEntropyHeadConfig, score_entropy_head, weighted_score_entropy_head

__all__ = ["ScoreEntropyHeadConfig", "score_entropy_head", "weighted_score_entropy_head"]
