"""Training objectives shared by connectors and heads."""

from .assignment import (
    prior_weighted_assignment,
    prototype_scores,
    sinkhorn,
    swapped_prediction_loss,
    word_frequency_prior,
)

__all__ = ["prior_weighted_assignment", "prototype_scores", "sinkhorn", "swapped_prediction_loss", "word_frequency_prior"]
