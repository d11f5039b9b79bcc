"""Losses computed where the model's tensors live: objectives fused with the vocabulary-parallel head."""
from . import score_entropy  # noqa: F401  (registers the score-entropy objectives)
from .objectives import OBJECTIVES, HeadObjective, head_objective
from .vocab_parallel import HeadLossConfig, score_entropy_head, weighted_score_entropy_head

__all__ = ["OBJECTIVES", "HeadLossConfig", "HeadObjective", "head_objective", "score_entropy_head",
           "weighted_score_entropy_head"]
