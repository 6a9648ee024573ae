"""LAION aesthetic reward: ``aesthetic`` = raw rating of CLIP ViT-L/14 + MLP head (REFERENCE.md §4)."""

from services.aesthetic.scorer import AestheticScorer

__all__ = ["AestheticScorer"]
