"""DINOv3 image features: the [CLS] token after the final norm (``pooler_output`` of ``DINOv3ViTModel``).

Preprocessing follows transformers' ``DINOv3ViTImageProcessor`` defaults, in its order: rescale to [0, 1],
resize to 224×224 bilinear with antialias (no crop, aspect ratio not kept), normalise with ImageNet mean/std.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DINOv3ViTConfig, DINOv3ViTModel

IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_HUB_ID = "facebook/dinov3-vits16-pretrain-lvd1689m"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def preprocess(images: list[torch.Tensor], size: int = IMAGE_SIZE) -> torch.Tensor:
    """B uint8 (3, H, W) RGB images of any sizes → (B, 3, size, size) float32."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for image in images:
        x = image.float().mul(1.0 / 255.0).unsqueeze(0)  # the processor multiplies by its rescale_factor
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append((x[0] - mean) / std)
    return torch.stack(out)


def tiny_config() -> DINOv3ViTConfig:
    """A two-layer DINOv3 ViT/16 at 224 with 4 register tokens, like the released models.

    The init range is 10× the default so that random features differ visibly between images.
    """
    return DINOv3ViTConfig(
        initializer_range=0.2,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_register_tokens=4,
        patch_size=16,
        image_size=IMAGE_SIZE,
    )


def build_tiny(seed: int) -> DINOv3ViTModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DINOv3ViTModel(tiny_config())


def resolve_dir(checkpoint: str) -> Path:
    """A local model directory, or a hub id (gated; downloaded only because it was asked for explicitly)."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return path
    if checkpoint.count("/") != 1:
        raise ValueError(
            f"--checkpoint {checkpoint!r} is neither a directory nor a hub id like {DEFAULT_HUB_ID!r}"
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(checkpoint, allow_patterns=["*.json", "*.safetensors"]))


def load_pretrained(directory: Path) -> DINOv3ViTModel:
    model = DINOv3ViTModel.from_pretrained(str(directory))
    if not isinstance(model.config, DINOv3ViTConfig):
        raise ValueError(f"{directory} holds a {type(model.config).__name__}, not a DINOv3 ViT")
    return model


def weights_sha256(directory: Path) -> str:
    """sha256 over the weight files in name order (= the file's own sha256 when there is one file)."""
    files = sorted(p for p in directory.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ValueError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {directory}")
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def cls_features(model: DINOv3ViTModel, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, 224, 224) → (B, hidden) pooler_output."""
    return model(pixel_values=pixels).pooler_output
