"""The LAION "improved aesthetic predictor" head (christophschuhmann/improved-aesthetic-predictor).

An MLP from a unit CLIP ViT-L/14 image embedding (768) to one rating on the AVA 1–10 scale, trained with MSE
on SAC + LAION-Logos + AVA ratings (``sac+logos+ava1-l14-linearMSE.pth``). Upstream's ``MLP`` has **no
activations** between the linear layers — the trained head is one affine map, in eval mode (dropout off), and
we keep the layer structure so its state dict loads with upstream's key names ``layers.{0,2,4,6,7}``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

EMBED_DIM = 768
"""Projection width of CLIP ViT-L/14, the head's input."""
HEAD_FILES = ("sac+logos+ava1-l14-linearMSE.pth", "laion-aesthetic-sac-logos-ava1-l14-linearMSE.pth")
"""Names the head is published / stored under; the first is upstream's."""


class AestheticHead(nn.Module):
    """Linear(768,1024)→Drop(0.2)→Linear(1024,128)→Drop(0.2)→Linear(128,64)→Drop(0.1)→Linear(64,16)→Linear(16,1)."""

    def __init__(self, embed_dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, unit_embedding: torch.Tensor) -> torch.Tensor:
        """(B, 768) L2-normalised image embeddings → (B,) ratings."""
        return self.layers(unit_embedding).squeeze(-1)


def load_head(path: Path) -> AestheticHead:
    """The head with the weights in ``path`` (a plain state dict), every key and shape checked."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = AestheticHead()
    head.load_state_dict(state, strict=True)
    return head
