"""HPSv2.1 (Wu et al., 2023, Human Preference Score v2): cosine of image and prompt embeddings.

score = ⟨f_img, f_txt⟩ of L2-normalised open_clip features, no logit scale (HPSv2 ``img_score.py``:
``image_features @ text_features.T`` with ``output_dict`` features, which open_clip normalises) — about
0.25–0.38 for text-to-image samples with the real model.

Image: HPSv2's eval transform in its order — /255 to a float tensor, longest side → 224 with torchvision's
antialiased bicubic on that tensor, zero-pad to 224² (the image is *not* cropped: the whole picture is
judged), OpenAI mean/std (``services.clip_shared.transforms.pad_transform``). Text: open_clip's CLIP BPE
tokenizer, 77 tokens, longer prompts truncated with end-of-text kept last.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from open_clip.model import CLIP

from services.clip_shared.transforms import pad_transform, preprocess_batch
from services.core.scorer import ModelIdentity, ScoreBatch, ScoreOutput, require_one_source
from services.hps import checkpoint as ckpt

VERSION = "1"


class HPSScorer:
    """Scores (image, prompt) pairs with an HPSv2 open_clip model; batches mixed prompts and image sizes."""

    def __init__(
        self, model: CLIP, tokenizer: ckpt.Tokenizer, *, checkpoint_sha256: str, device: str
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._identity = ModelIdentity(
            name="hps", version=VERSION, checkpoint_sha256=checkpoint_sha256, outputs=("hps",)
        )

    @classmethod
    def build(cls, *, checkpoint: str | None = None, tiny: bool = False, device: str = "cpu") -> HPSScorer:
        require_one_source("hps", checkpoint, tiny, f"e.g. {ckpt.HUB_REPO}")
        loaded = ckpt.build_tiny() if checkpoint is None else ckpt.load(checkpoint)
        return cls(loaded.model, loaded.tokenizer, checkpoint_sha256=loaded.sha256, device=device)

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    def validate(self, prompt: str, metadata: Mapping[str, Any] | None) -> None:
        return None  # any prompt is scorable; long ones are truncated to 77 tokens like the reference

    @torch.inference_mode()
    def score(self, batch: ScoreBatch) -> ScoreOutput:
        pixels = preprocess_batch(batch.images, pad_transform, self.device)
        image_features = self.model.encode_image(pixels, normalize=True)
        text_features, prompt_index = self.encode_prompts(batch.prompts)
        cosine = (image_features * text_features[prompt_index]).sum(dim=-1)
        return ScoreOutput(samples={"hps": cosine.float().cpu()})

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit text embeddings of the distinct prompts, and each sample's row in them."""
        unique = list(dict.fromkeys(prompts))
        row = {prompt: i for i, prompt in enumerate(unique)}
        tokens = self.tokenizer(unique).to(self.device)
        index = torch.tensor([row[p] for p in prompts], device=self.device)
        return self.model.encode_text(tokens, normalize=True), index
