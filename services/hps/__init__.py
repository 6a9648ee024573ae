"""HPSv2.1 reward (v2.0 checkpoint accepted): ``hps`` = cosine of normalised features (REFERENCE.md §4)."""

from services.hps.scorer import HPSScorer

__all__ = ["HPSScorer"]
