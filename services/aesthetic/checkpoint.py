"""The aesthetic predictor's two parts: CLIP ViT-L/14 and the LAION MLP head.

CLIP (``--checkpoint``): ``openai/clip-vit-large-patch14`` by hub id, or a local directory with its
``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``). Head (``--head``): a local file — it is
published on GitHub, not on the hub, so it is never downloaded; without ``--head`` it is looked up inside the
CLIP directory under one of :data:`services.aesthetic.head.HEAD_FILES`.
Tiny: a ``CLIPModel`` of the same class with a 768-wide projection (the head's input) and a seeded head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from services.aesthetic.head import EMBED_DIM, HEAD_FILES, AestheticHead, load_head
from services.clip_shared.tiny import TINY_SEED, seeded, tiny_clip_config
from services.clip_shared.weights import hf_weight_files, resolve_hf_dir, weights_sha256

CLIP_ID = "openai/clip-vit-large-patch14"


@dataclass(kw_only=True)
class AestheticCheckpoint:
    clip: CLIPModel
    head: AestheticHead
    sha256: str
    """sha256 over the CLIP weight file(s) and the head file, or ``tiny:<seed>``."""


def find_head(clip_checkpoint: str) -> Path:
    """The head file inside the CLIP directory, for when ``--head`` is not given."""
    directory = Path(clip_checkpoint).expanduser()
    for name in HEAD_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ValueError(
        f"no aesthetic head given and none of {', '.join(HEAD_FILES)} in {clip_checkpoint}; pass --head PATH "
        "(sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor)"
    )


def load(clip_checkpoint: str, head_path: Path) -> AestheticCheckpoint:
    """CLIP ViT-L/14 from ``clip_checkpoint`` (hub id or directory) and the head from ``head_path``."""
    if not head_path.is_file():
        raise ValueError(f"aesthetic head {head_path} does not exist")
    clip_dir = resolve_hf_dir(clip_checkpoint)
    # transformers 5 keeps the stored dtype by default; the scores are defined in float32
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32)
    if clip.config.projection_dim != EMBED_DIM:
        raise ValueError(
            f"{clip_checkpoint} projects to {clip.config.projection_dim} dims; the aesthetic head takes "
            f"{EMBED_DIM} (CLIP ViT-L/14)"
        )
    head = load_head(head_path)
    return AestheticCheckpoint(
        clip=clip, head=head, sha256=weights_sha256([*hf_weight_files(clip_dir), head_path])
    )


def tiny_config() -> CLIPConfig:
    """A 2-layer, 32-wide CLIP at 224² projecting to 768 dims like ViT-L/14 (its text tower is unused)."""
    return tiny_clip_config(projection_dim=EMBED_DIM)


def build_tiny(seed: int = TINY_SEED) -> AestheticCheckpoint:
    with seeded(seed):
        clip = CLIPModel(tiny_config())
        head = AestheticHead()
    return AestheticCheckpoint(clip=clip, head=head, sha256=f"tiny:{seed}")
