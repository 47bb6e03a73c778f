"""Metrics: toy-distribution distances and score errors (more to follow)."""
from ncsn.metrics.toy import energy_distance, score_error, sliced_wasserstein

__all__ = ["energy_distance", "score_error", "sliced_wasserstein"]
