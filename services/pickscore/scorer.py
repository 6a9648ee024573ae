"""PickScore (Kirstain et al., 2023): CLIP preference score of an image for its prompt.

score = logit_scale.exp() · cos(image embedding, text embedding), as in PickScore's inference example
(``model.logit_scale.exp() * text_embs @ image_embs.T`` on L2-normalised ``get_*_features``); the RL reward
divides it by 26 (flow_grpo / DiffusionNFT's ``pickscore`` reward). The real model's logit_scale.exp() is
about 100, so raw scores of text-to-image samples typically lie around 18–24 (reward ≈ 0.7–0.92).

Image: transformers' CLIPImageProcessor for the ViT-H processor — shortest side → 224 with PIL bicubic,
centre crop 224, /255, OpenAI mean/std (services.clip_shared.transforms). Text: CLIP BPE, truncated to 77
tokens (start and end-of-text kept), padded to the longest prompt of the batch; the causal text transformer
pools at the end-of-text token, so padding never changes a score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import CLIPModel, PreTrainedTokenizerBase

from services.clip_shared.transforms import center_crop_transform, preprocess_batch
from services.core.scorer import ModelIdentity, ScoreBatch, ScoreOutput, require_one_source
from services.pickscore import checkpoint as ckpt

REWARD_SCALE = 26.0
"""flow_grpo's PickScore reward is the raw score / 26."""
VERSION = "1"


class PickScoreScorer:
    """Scores (image, prompt) pairs with a PickScore CLIP model; batches mixed prompts and image sizes."""

    def __init__(
        self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase, *, checkpoint_sha256: str, device: str
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._identity = ModelIdentity(
            name="pickscore",
            version=VERSION,
            checkpoint_sha256=checkpoint_sha256,
            outputs=("pickscore", "pickscore/raw"),
        )

    @classmethod
    def build(
        cls, *, checkpoint: str | None = None, tiny: bool = False, device: str = "cpu"
    ) -> PickScoreScorer:
        require_one_source("pickscore", checkpoint, tiny, f"e.g. {ckpt.MODEL_ID}")
        loaded = ckpt.build_tiny() if checkpoint is None else ckpt.load(checkpoint)
        return cls(loaded.model, loaded.tokenizer, checkpoint_sha256=loaded.sha256, device=device)

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    def validate(self, prompt: str, metadata: Mapping[str, Any] | None) -> None:
        return None  # any prompt is scorable; long ones are truncated to 77 tokens like the reference

    @torch.inference_mode()
    def score(self, batch: ScoreBatch) -> ScoreOutput:
        pixels = preprocess_batch(batch.images, center_crop_transform, self.device)
        image_features = _unit(self.model.get_image_features(pixel_values=pixels).pooler_output)
        text_features, prompt_index = self.encode_prompts(batch.prompts)
        cosine = (image_features * text_features[prompt_index]).sum(dim=-1)
        raw = (self.model.logit_scale.exp() * cosine).float().cpu()
        return ScoreOutput(samples={"pickscore": raw / REWARD_SCALE, "pickscore/raw": raw})

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit text embeddings of the distinct prompts, and each sample's row in them.

        A rollout batch holds many images per prompt; each prompt goes through the text tower once.
        """
        unique = list(dict.fromkeys(prompts))
        row = {prompt: i for i, prompt in enumerate(unique)}
        tokens = self.tokenizer(
            unique, padding=True, truncation=True, max_length=ckpt.MAX_TOKENS, return_tensors="pt"
        ).to(self.device)
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
        index = torch.tensor([row[p] for p in prompts], device=self.device)
        return _unit(features), index


def _unit(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True)
