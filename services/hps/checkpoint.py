"""HPSv2's model and tokenizer: the real checkpoint (file, directory or hub id) or a tiny seeded one.

Real (HPSv2 ``img_score.py``): open_clip ``ViT-H-14`` built without pretrained weights, then the
``state_dict`` entry of ``HPS_v2.1_compressed.pt`` (v2.1) or ``HPS_v2_compressed.pt`` (v2.0) loaded over all
of it — strictly, so a renamed or missing weight cannot silently stay at its random initialisation. Tiny: an
open_clip ``CLIP`` of the same class from a small config with CLIP's real vocabulary. Both use open_clip's
bundled CLIP BPE tokenizer (77 tokens), which is what HPSv2 scores with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from services.clip_shared.tiny import TINY_SEED, seeded
from services.clip_shared.tokenizer import VOCAB_SIZE
from services.clip_shared.transforms import IMAGE_SIZE
from services.clip_shared.weights import resolve_hub_file, weights_sha256

ARCHITECTURE = "ViT-H-14"
HUB_REPO = "xswu/HPSv2"
CHECKPOINT_FILES = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")
"""Accepted file names, preferred first: HPSv2.1, then HPSv2.0."""
CONTEXT_LENGTH = 77

Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass(kw_only=True)
class HPSCheckpoint:
    model: CLIP
    tokenizer: Tokenizer
    sha256: str
    """sha256 of the loaded .pt file, or ``tiny:<seed>``."""


def tiny_model() -> CLIP:
    """A 2-layer, 32-wide open_clip CLIP at HPS's 224² input (patch 32: 49 image tokens)."""
    return CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=32, image_size=IMAGE_SIZE),
        text_cfg=CLIPTextCfg(
            context_length=CONTEXT_LENGTH, vocab_size=VOCAB_SIZE, width=32, heads=2, layers=2
        ),
    )


def build_tiny(seed: int = TINY_SEED) -> HPSCheckpoint:
    with seeded(seed):
        model = tiny_model()
    return HPSCheckpoint(model=model, tokenizer=open_clip.get_tokenizer(ARCHITECTURE), sha256=f"tiny:{seed}")


def load(checkpoint: str) -> HPSCheckpoint:
    """``checkpoint``: the .pt file, a directory holding one of :data:`CHECKPOINT_FILES`, or a hub repo id."""
    path = resolve_hub_file(checkpoint, CHECKPOINT_FILES)
    model = open_clip.create_model(ARCHITECTURE, pretrained=None)
    load_state(model, path)
    return HPSCheckpoint(
        model=model, tokenizer=open_clip.get_tokenizer(ARCHITECTURE), sha256=weights_sha256([path])
    )


def load_state(model: CLIP, path: Path) -> None:
    """Load HPS weights from ``path`` (``{"state_dict": ...}``) into ``model``, every key accounted for."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, Mapping) or "state_dict" not in saved:
        raise ValueError(f"{path} is not an HPS checkpoint: expected a dict with a 'state_dict' entry")
    state = {_strip_ddp_prefix(key): value for key, value in saved["state_dict"].items()}
    model.load_state_dict(state, strict=True)


def _strip_ddp_prefix(key: str) -> str:
    """Checkpoints saved from a DistributedDataParallel wrapper prefix every key with ``module.``."""
    return key.removeprefix("module.")
