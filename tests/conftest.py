"""Shared test helpers: small in-memory scorers and a loopback server fixture."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.core.scorer import ModelIdentity, ScoreBatch, ScoreOutput
from services.core.server import RewardServer, ServerConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
GENEVAL_SAMPLE = SHARED / "data" / "geneval_metadata_format_sample.jsonl"
"""Upstream GenEval metadata records, the format our prompt files must match."""
needs_geneval_sample = pytest.mark.skipif(
    not GENEVAL_SAMPLE.is_file(), reason=f"{GENEVAL_SAMPLE} not present"
)


class MeanPixelScorer:
    """Scores an image by its mean pixel value / 255; records every batch it sees.

    ``seconds_per_image`` makes batches cost time so that queues build up; ``gate`` (an Event) lets a
    test hold the model until it releases it. Per-group output: the mean of the group's scores.
    """

    def __init__(self, *, seconds_per_image: float = 0.0, gate: threading.Event | None = None) -> None:
        self.seconds_per_image = seconds_per_image
        self.gate = gate
        self.batches: list[list[str]] = []  # prompts of each executed batch
        self.lock = threading.Lock()
        self._identity = ModelIdentity(
            name="meanpixel",
            version="test",
            checkpoint_sha256="none",
            outputs=("meanpixel", "meanpixel/x2"),
            group_outputs=("meanpixel/group_mean",),
        )

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    def validate(self, prompt: str, metadata: Mapping[str, Any] | None) -> None:
        if metadata is not None and "reject" in metadata:
            raise ValueError(f"metadata field 'reject' is not allowed (got {metadata['reject']!r})")

    def score(self, batch: ScoreBatch) -> ScoreOutput:
        if self.gate is not None:
            self.gate.wait(timeout=30)
        with self.lock:
            self.batches.append(list(batch.prompts))
        if self.seconds_per_image:
            time.sleep(self.seconds_per_image * len(batch))
        values = torch.tensor(
            [img.double().mean().item() / 255.0 for img in batch.images], dtype=torch.float64
        )
        groups: dict[str, list[float]] = {}
        for gid, value in zip(batch.group_ids, values.tolist(), strict=True):
            if gid:
                groups.setdefault(gid, []).append(value)
        return ScoreOutput(
            samples={"meanpixel": values, "meanpixel/x2": 2 * values},
            groups={gid: {"meanpixel/group_mean": float(np.mean(v))} for gid, v in groups.items()},
        )

    def seen_prompts(self) -> list[str]:
        with self.lock:
            return [p for batch in self.batches for p in batch]


def solid_images(values: list[int], size: int = 8) -> np.ndarray:
    """(B, size, size, 3) uint8 images, image i filled with values[i]."""
    return np.stack([np.full((size, size, 3), v, dtype=np.uint8) for v in values])


PREPROCESSING_SIZES = (
    (37, 53),  # odd, upscaled
    (150, 200),  # downscaled
    (201, 97),  # tall, odd
    (512, 512),  # what the trainer sends
    (300, 224),  # one side already 224
    (229, 600),  # wide, odd crop margin
    (97, 1201),  # very wide
    (7, 500),  # extreme wide
    (500, 7),  # extreme tall
    (1, 225),  # one row
    (225, 1),  # one column
)
"""(height, width) of the images every scorer's preprocessing is compared on against its upstream order."""


def random_image(height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 noise, seeded by its size: the worst case for resize rounding."""
    rng = np.random.default_rng(height * 100_003 + width)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@contextlib.asynccontextmanager
async def running_server(
    scorer: Any, config: ServerConfig | None = None, name: str = "meanpixel"
) -> AsyncIterator[RewardServer]:
    """A real gRPC server on a free loopback port for the duration of the block."""
    config = config or ServerConfig(port=0)
    if config.port != 0:
        raise ValueError("tests must bind port 0")
    server = RewardServer(lambda: scorer, name, config)
    await server.start()
    try:
        yield server
    finally:
        await server.drain()
