"""ImageReward v1.0, implemented in the project (BLIP ViT-L/16 + cross-attention BERT + MLP head)."""

from services.imagereward.scorer import ImageRewardScorer

__all__ = ["ImageRewardScorer"]
