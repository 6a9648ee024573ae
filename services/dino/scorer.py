"""The ``dino`` scorer: diversity of a prompt's samples, from DINOv3 features and from pixel statistics.

Per group (the samples sharing a ``group_id`` in one request):
- ``dino/diversity``: mean pairwise cosine distance (1 − cos) of the DINOv3 CLS features, in [0, 2]
  (≈ [0, 1] in practice); 0.0 for a group of one.
- ``pvs``: DivGenBench's Photographic Variance Score of the group's images (no model).

Per sample, ``dino/mean_distance_to_group``: the sample's mean cosine distance to the other members of its
group, so the group mean of this value is the group's ``dino/diversity``. A sample without a group id (or
alone in its group) has no one to differ from and gets 0.0; it appears in no group output. Prompts and
metadata are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import DINOv3ViTModel

from services.core.scorer import ModelIdentity, ScoreBatch, ScoreOutput, require_one_source
from services.dino.diversity import (
    cosine_distances,
    mean_distance_to_others,
    mean_pairwise_distance,
    photographic_variance_score,
)
from services.dino.features import (
    IMAGE_SIZE,
    build_tiny,
    cls_features,
    load_pretrained,
    preprocess,
    resolve_dir,
    weights_sha256,
)

TINY_SEED = 0
VERSION = "1"


class DinoScorer:
    def __init__(self, model: DINOv3ViTModel, *, checkpoint_sha256: str, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._identity = ModelIdentity(
            name="dino",
            version=VERSION,
            checkpoint_sha256=checkpoint_sha256,
            outputs=("dino/mean_distance_to_group",),
            group_outputs=("dino/diversity", "pvs"),
            preferred_size=(IMAGE_SIZE, IMAGE_SIZE),
        )

    @classmethod
    def build(cls, *, checkpoint: str | None = None, tiny: bool = False, device: str = "cpu") -> DinoScorer:
        require_one_source(
            "dino",
            checkpoint,
            tiny,
            "e.g. facebook/dinov3-vits16-pretrain-lvd1689m, gated, or a local copy of it",
        )
        if tiny:
            return cls(build_tiny(TINY_SEED), checkpoint_sha256=f"tiny:{TINY_SEED}", device=device)
        directory = resolve_dir(checkpoint)
        return cls(load_pretrained(directory), checkpoint_sha256=weights_sha256(directory), device=device)

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    def validate(self, prompt: str, metadata: Mapping[str, Any] | None) -> None:
        return None

    def features(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(B, hidden) CLS features of B uint8 (3, H, W) images."""
        with torch.inference_mode():
            return cls_features(self.model, preprocess(images).to(self.device)).float().cpu()

    def score(self, batch: ScoreBatch) -> ScoreOutput:
        images = list(batch.images)
        features = self.features(images)
        members: dict[str, list[int]] = {}
        for index, gid in enumerate(batch.group_ids):
            if gid:
                members.setdefault(gid, []).append(index)
        per_sample = torch.zeros(len(batch), dtype=torch.float64)
        groups: dict[str, dict[str, float]] = {}
        for gid, indices in members.items():
            distances = cosine_distances(features[indices])
            per_sample[indices] = mean_distance_to_others(distances)
            groups[gid] = {
                "dino/diversity": mean_pairwise_distance(distances),
                "pvs": photographic_variance_score([images[i] for i in indices]),
            }
        return ScoreOutput(samples={"dino/mean_distance_to_group": per_sample}, groups=groups)
