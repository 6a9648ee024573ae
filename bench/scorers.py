"""Scorers the benchmarks serve: a CLIP of realistic per-image cost, a free one, and a slow wrapper.

The serving benchmark needs a model whose batch time grows with the batch, as a real reward model's does,
but no weights can be downloaded here. :func:`bench_clip_scorer` is the aesthetic scorer (CLIP image tower +
LAION MLP head, the same preprocessing: bicubic resize of the 512² input to 224, centre crop) with a ViT
of ~20M parameters at random initialisation. Random weights cost exactly what trained weights cost.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel

from services.aesthetic.head import EMBED_DIM, AestheticHead
from services.aesthetic.scorer import AestheticScorer
from services.clip_shared.tiny import seeded, tiny_clip_config
from services.core.scorer import ModelIdentity, ScoreBatch, ScoreOutput, Scorer

BENCH_SEED = 0

VISION = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 8}
"""ViT-B/32 layout (224 px, patch 32 → 50 tokens) at width 512 and 6 layers: ~20M parameters per image."""


def bench_clip_config() -> CLIPConfig:
    """The benchmark CLIP: a ViT-B/32-style image tower; the text tower is minimal (the rating ignores it)."""
    return tiny_clip_config(projection_dim=EMBED_DIM, vision=VISION)


def bench_clip_scorer(device: str = "cpu") -> AestheticScorer:
    """The aesthetic scorer on :func:`bench_clip_config`, seeded: every process builds the same weights."""
    with seeded(BENCH_SEED):
        clip = CLIPModel(bench_clip_config())
        head = AestheticHead()
    return AestheticScorer(clip, head, checkpoint_sha256=f"bench:{BENCH_SEED}", device=device)


def vision_parameters(scorer: AestheticScorer) -> int:
    """Parameters that run per image: the vision tower, its projection and the head."""
    clip = scorer.clip
    modules = (clip.vision_model, clip.visual_projection, scorer.head)
    return sum(p.numel() for m in modules for p in m.parameters())


class NullScorer:
    """Scores 0 without looking at the pixels: what is left of a request's time is transport."""

    def __init__(self) -> None:
        self._identity = ModelIdentity(
            name="null", version="bench", checkpoint_sha256="none", outputs=("null",)
        )

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    def validate(self, prompt: str, metadata: Mapping[str, Any] | None) -> None:
        return None

    def score(self, batch: ScoreBatch) -> ScoreOutput:
        return ScoreOutput(samples={"null": torch.zeros(len(batch), dtype=torch.float64)})


class SleepingScorer:
    """Wraps a scorer so that a batch of n images takes at least ``seconds_per_image``·n seconds.

    The padding is a sleep: it models a reward service that is slower than the trainer's rollout (a bigger
    model, a busy shared GPU) without stealing the trainer's CPU cores.
    """

    def __init__(self, inner: Scorer, seconds_per_image: float) -> None:
        if seconds_per_image < 0:
            raise ValueError(f"seconds_per_image must be >= 0, got {seconds_per_image}")
        self.inner = inner
        self.seconds_per_image = seconds_per_image

    @property
    def identity(self) -> ModelIdentity:
        return self.inner.identity

    def validate(self, prompt: str, metadata: Mapping[str, Any] | None) -> None:
        self.inner.validate(prompt, metadata)

    def score(self, batch: ScoreBatch) -> ScoreOutput:
        started = time.perf_counter()
        output = self.inner.score(batch)
        remaining = self.seconds_per_image * len(batch) - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)
        return output
