"""PickScore reward: ``pickscore`` = raw / 26 and ``pickscore/raw`` (REFERENCE.md §4)."""

from services.pickscore.scorer import PickScoreScorer

__all__ = ["PickScoreScorer"]
