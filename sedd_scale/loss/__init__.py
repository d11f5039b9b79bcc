"""Losses computed where the model's tensors live: objectives fused with the vocabulary-parallel head."""
from . import masked_ce, score_entropy  # noqa: F401  (register the objectives)
from .objectives import OBJECTIVES, HeadObjective, head_objective, parametrization_of
from .vocab_parallel import HeadLossConfig, score_entropy_head, weighted_score_entropy_head

__all__ = ["OBJECTIVES", "HeadLossConfig", "HeadObjective", "head_objective", "parametrization_of",
           "score_entropy_head", "weighted_score_entropy_head"]
