"""Reward = −(JPEG size in kB at quality 95) / 500.

Used as an RL reward for diffusion models by DDPO (Black et al., 2023, "jpeg_compressibility"): smaller
files mean simpler images. kB is 1000 bytes. It needs no weights, so it exercises the whole serving
path (and the trainer's reward plumbing) without a model download.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from services.core.scorer import ModelIdentity, ScoreBatch, ScoreOutput

JPEG_QUALITY = 95
KB = 1000.0
SCALE = 500.0


def jpeg_kilobytes(image: torch.Tensor, quality: int = JPEG_QUALITY) -> float:
    """Size in kB of a (3, H, W) uint8 image encoded as JPEG at ``quality``."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).save(
        buffer, format="JPEG", quality=quality
    )
    return buffer.tell() / KB


class CompressibilityScorer:
    """Scores each image by how small its JPEG is; prompts and metadata are ignored."""

    def __init__(self) -> None:
        self._identity = ModelIdentity(
            name="compressibility",
            version="1",
            checkpoint_sha256="none:weight-free",
            outputs=("compressibility", "compressibility/jpeg_kb"),
        )

    @classmethod
    def build(
        cls, *, checkpoint: str | None = None, tiny: bool = False, device: str = "cpu", **options: Any
    ) -> CompressibilityScorer:
        if options:
            raise ValueError(f"compressibility takes no options, got {sorted(options)}")
        if checkpoint is not None:
            raise ValueError("compressibility has no checkpoint; drop --checkpoint")
        return cls()

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    def validate(self, prompt: str, metadata: Mapping[str, Any] | None) -> None:
        return None

    def score(self, batch: ScoreBatch) -> ScoreOutput:
        sizes = torch.tensor([jpeg_kilobytes(image) for image in batch.images], dtype=torch.float64)
        return ScoreOutput(samples={"compressibility": -sizes / SCALE, "compressibility/jpeg_kb": sizes})
