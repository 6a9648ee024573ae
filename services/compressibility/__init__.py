"""JPEG compressibility reward (the DDPO line of work): a real, weight-free scorer."""

from services.compressibility.scorer import CompressibilityScorer

__all__ = ["CompressibilityScorer"]
