"""ImageReward v1.0 (Xu et al., 2023): BLIP ViT-L/16 + BLIP cross-attention text encoder + a linear MLP head.

reward = (head(text_encoder(prompt | image)[:, 0]) − μ) / σ with μ, σ the standardisation constants of the
released checkpoint (upstream ``ImageReward.py``). The feature is the [CLS] position's final text state after
it has cross-attended to all image tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from services.imagereward.med import MedTextEncoder, TextConfig
from services.imagereward.vit import VisionConfig, VisionTransformer

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
HEAD_WIDTHS = (1024, 128, 64, 16)


class RewardHead(nn.Module):
    """Linear(d,1024)→Drop(.2)→Linear(1024,128)→Drop(.2)→Linear(128,64)→Drop(.1)→Linear(64,16)→Linear(16,1).

    No activations (upstream has them commented out), so the head is one affine map at inference; it is kept
    layer by layer because the checkpoint stores ``layers.{0,2,4,6,7}``.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        w1, w2, w3, w4 = HEAD_WIDTHS
        self.layers = nn.Sequential(
            nn.Linear(in_features, w1),
            nn.Dropout(0.2),
            nn.Linear(w1, w2),
            nn.Dropout(0.2),
            nn.Linear(w2, w3),
            nn.Dropout(0.1),
            nn.Linear(w3, w4),
            nn.Linear(w4, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class ImageRewardModel(nn.Module):
    """Attribute names mirror upstream's ``blip.visual_encoder`` / ``blip.text_encoder`` / ``mlp``."""

    def __init__(self, vision: VisionConfig, text: TextConfig) -> None:
        super().__init__()
        if text.encoder_width != vision.width:
            raise ValueError(
                f"text encoder_width ({text.encoder_width}) must equal the ViT width ({vision.width})"
            )
        self.visual_encoder = VisionTransformer(vision)
        self.text_encoder = MedTextEncoder(text)
        self.mlp = RewardHead(text.hidden_size)

    def features(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """pixels (B, 3, 224, 224), ids/mask (B, L) → [CLS] text state (B, hidden), float32."""
        image_embeds = self.visual_encoder(pixels)
        return self.text_encoder(input_ids, attention_mask, image_embeds)[:, 0].float()

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Standardised reward, (B,)."""
        raw = self.mlp(self.features(pixels, input_ids, attention_mask)).squeeze(-1)
        return (raw - REWARD_MEAN) / REWARD_STD


def tiny_configs(vocab_size: int) -> tuple[VisionConfig, TextConfig]:
    """A few-layer model with the real input contract (224² pixels, 35 tokens) for tests and the demo."""
    vision = VisionConfig(width=48, depth=2, num_heads=4)
    text = TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        encoder_width=vision.width,
    )
    return vision, text


def build_tiny(vocab_size: int, seed: int) -> ImageRewardModel:
    """Deterministic random weights; the learned tokens get small non-zero values so they matter in tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageRewardModel(*tiny_configs(vocab_size))
        with torch.no_grad():
            for parameter in (model.visual_encoder.cls_token, model.visual_encoder.pos_embed):
                parameter.normal_(std=0.02)
    return model
