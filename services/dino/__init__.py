"""DINOv3 feature diversity and DivGenBench PVS per prompt group."""

from services.dino.scorer import DinoScorer

__all__ = ["DinoScorer"]
