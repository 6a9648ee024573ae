"""LAION aesthetic score: the improved aesthetic predictor's rating of an image (prompt ignored).

rating = MLP(e / ‖e‖) with e = CLIP ViT-L/14's projected image embedding (upstream ``simple_inference.py``
normalises ``encode_image`` output before the MLP; flow_grpo's ``aesthetic`` reward does the same with
transformers' ``get_image_features``). Raw rating on the AVA scale, roughly 1–10 (SD images ≈ 5–6.5), not
rescaled.

Image: CLIP ViT-L/14 preprocessing as transformers' CLIPImageProcessor does it — shortest side → 224 with
PIL bicubic, centre crop 224, /255, OpenAI mean/std (services.clip_shared.transforms).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPModel

from services.aesthetic import checkpoint as ckpt
from services.aesthetic.head import AestheticHead
from services.clip_shared.transforms import center_crop_transform, preprocess_batch
from services.core.flags import ArgumentAdder
from services.core.scorer import ModelIdentity, ScoreBatch, ScoreOutput, require_one_source

VERSION = "1"


class AestheticScorer:
    """Rates images with CLIP ViT-L/14 + the LAION MLP head; batches mixed image sizes."""

    def __init__(self, clip: CLIPModel, head: AestheticHead, *, checkpoint_sha256: str, device: str) -> None:
        self.device = torch.device(device)
        self.clip = clip.to(self.device).eval().requires_grad_(False)
        self.head = head.to(self.device).eval().requires_grad_(False)
        self._identity = ModelIdentity(
            name="aesthetic", version=VERSION, checkpoint_sha256=checkpoint_sha256, outputs=("aesthetic",)
        )

    @classmethod
    def build(
        cls,
        *,
        checkpoint: str | None = None,
        tiny: bool = False,
        device: str = "cpu",
        head: str | Path | None = None,
    ) -> AestheticScorer:
        """``checkpoint``: CLIP ViT-L/14 (hub id or directory); ``head``: the MLP head file."""
        require_one_source("aesthetic", checkpoint, tiny, f"CLIP ViT-L/14, e.g. {ckpt.CLIP_ID}")
        if tiny:
            if head is not None:
                raise ValueError("--tiny builds a seeded head; drop --head or --tiny")
            loaded = ckpt.build_tiny()
        else:
            assert checkpoint is not None
            head_path = Path(head).expanduser() if head is not None else ckpt.find_head(checkpoint)
            loaded = ckpt.load(checkpoint, head_path)
        return cls(loaded.clip, loaded.head, checkpoint_sha256=loaded.sha256, device=device)

    @staticmethod
    def add_arguments(parser: ArgumentAdder) -> None:
        """Command-line options of :meth:`build` (``python -m services.serve aesthetic ...``)."""
        parser.add_argument(
            "--head",
            help="LAION aesthetic MLP head (sac+logos+ava1-l14-linearMSE.pth); default: looked up in the "
            "--checkpoint directory",
        )

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    def validate(self, prompt: str, metadata: Mapping[str, Any] | None) -> None:
        return None  # the rating does not depend on the prompt

    @torch.inference_mode()
    def score(self, batch: ScoreBatch) -> ScoreOutput:
        pixels = preprocess_batch(batch.images, center_crop_transform, self.device)
        embedding = self.clip.get_image_features(pixel_values=pixels).pooler_output
        rating = self.head(embedding / embedding.norm(dim=-1, keepdim=True))
        return ScoreOutput(samples={"aesthetic": rating.float().cpu()})
