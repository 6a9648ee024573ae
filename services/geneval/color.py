"""GenEval's zero-shot colour classifier: CLIP ViT-L/14 (OpenAI weights) over ten colour names.

Per object class, each colour's text feature is the average of three templates' L2-normalised text features,
renormalised (REFERENCE.md §4; upstream builds it with clip_benchmark's ``zero_shot_classifier``). An object
is cropped the way upstream ``evaluate_images.py`` (``ImageCrops``) does:

1. with a mask, the whole image is composited on a flat ``#999`` grey by the mask (object pixels kept,
   everything else grey); without a mask the image is used as is;
2. that image is cropped to the detection box, rounded to whole pixels as PIL's ``Image.crop`` rounds the
   float box upstream hands it (Python ``round``, half to even);
3. CLIP's own preprocessing: shortest side resized to 224 bicubic, centre crop, OpenAI mean/std.

Logits are ``100 · cos(image, colour)``; the predicted colour is their argmax.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from services.clip_shared.tokenizer import VOCAB_SIZE
from services.core.hashing import file_sha256
from services.geneval.metadata import COLORS
from services.geneval.rules import Detection

COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {cls}",
    "a photo of a {c}-colored {cls}",
    "a photo of a {c} object",
)
"""Upstream GenEval's three colour prompts; ``{c}`` is the colour, ``{cls}`` the object class."""

BACKGROUND_RGB: tuple[int, int, int] = (0x99, 0x99, 0x99)
"""Upstream's default ``bgcolor`` "#999" (CSS shorthand for #999999): a neutral grey outside the mask."""

LOGIT_SCALE = 100.0
"""clip_benchmark's fixed scale of cosine similarities (not the model's learnt logit_scale)."""

CLIP_MODEL_NAME = "ViT-L-14-quickgelu"
"""open_clip config of OpenAI's ViT-L/14, which was trained with QuickGELU; plain "ViT-L-14" would load the
same weights with another activation and silently give other features."""

TINY_CLIP_KWARGS: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 28, "patch_size": 14, "width": 32, "head_width": 16, "layers": 2},
    "text_cfg": {"context_length": 77, "vocab_size": VOCAB_SIZE, "width": 32, "heads": 2, "layers": 2},
}
"""ViT-L/14's layout in miniature (patch 14, the real tokenizer and vocabulary) for tests and ``--tiny``."""


def color_crop(
    image: np.ndarray,
    box: Sequence[float],
    mask: np.ndarray | None,
    background: tuple[int, int, int] = BACKGROUND_RGB,
) -> Image.Image:
    """The crop the colour classifier sees: (H, W, 3) uint8 image, (x1, y1, x2, y2) box, (H, W) bool mask."""
    if mask is not None:
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask must have the image's size {image.shape[:2]}, got {mask.shape}.")
        image = np.where(mask[..., None], image, np.asarray(background, dtype=np.uint8))
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    # A box thinner than half a pixel rounds to nothing; CLIP needs at least one pixel.
    x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    return Image.fromarray(np.ascontiguousarray(image)).crop((x1, y1, x2, y2))


class ColorClassifier:
    """Zero-shot colour of detected objects with an open_clip CLIP model."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        preprocess: Callable[[Image.Image], torch.Tensor],
        *,
        weights_sha256: str,
        description: str,
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"color batch_size must be >= 1, got {batch_size}.")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.weights_sha256 = weights_sha256
        self.description = description
        self.device = device
        self.batch_size = batch_size
        self._text: dict[str, torch.Tensor] = {}

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: str = "cpu", batch_size: int = 32
    ) -> ColorClassifier:
        """OpenAI CLIP ViT-L/14 from a local file: an open_clip/OpenAI state dict or OpenAI's TorchScript
        ``ViT-L-14.pt``. Never downloads."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--clip-checkpoint must be an existing file, got {path}.")
        model = load_clip(path, model_name=CLIP_MODEL_NAME)
        if model.visual.patch_size != (14, 14) or model.text_projection.shape[1] != 768:
            raise ValueError(
                f"--clip-checkpoint must hold CLIP ViT-L/14 weights, got another model in {path}."
            )
        return cls._with_open_clip_io(
            model,
            weights_sha256=file_sha256(path),
            description="clip-vit-l-14",
            device=device,
            batch_size=batch_size,
        )

    @classmethod
    def tiny(cls, *, seed: int = 0, device: str = "cpu", batch_size: int = 32) -> ColorClassifier:
        """A randomly initialised miniature of ViT-L/14 (seeded), built offline."""
        import open_clip

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(CLIP_MODEL_NAME, pretrained=None, **TINY_CLIP_KWARGS)
        return cls._with_open_clip_io(
            model,
            weights_sha256=f"tiny:{seed}",
            description="clip-tiny",
            device=device,
            batch_size=batch_size,
        )

    @classmethod
    def _with_open_clip_io(cls, model: torch.nn.Module, **kwargs: Any) -> ColorClassifier:
        import open_clip

        # Defaults are OpenAI CLIP's: shortest side → image_size bicubic, centre crop, OpenAI mean/std.
        preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
        return cls(model, open_clip.get_tokenizer("ViT-L-14"), preprocess, **kwargs)

    @torch.no_grad()
    def text_classifier(self, cls_name: str) -> torch.Tensor:
        """(D, 10) unit colour features for one object class, in ``COLORS`` order; cached per class."""
        if cls_name not in self._text:
            columns = []
            for color in COLORS:
                texts = [t.format(c=color, cls=cls_name) for t in COLOR_TEMPLATES]
                features = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
                mean = F.normalize(features, dim=-1).mean(dim=0)
                columns.append(mean / mean.norm())
            self._text[cls_name] = torch.stack(columns, dim=1)
        return self._text[cls_name]

    @torch.no_grad()
    def logits(self, crops: Sequence[Image.Image], classes: Sequence[str]) -> torch.Tensor:
        """(N, 10) logits ``100 · cos`` of each crop against its class's colour features."""
        if len(crops) != len(classes):
            raise ValueError(f"need one class per crop, got {len(classes)} classes for {len(crops)} crops.")
        out = []
        for start in range(0, len(crops), self.batch_size):
            pixels = torch.stack([self.preprocess(c) for c in crops[start : start + self.batch_size]])
            features = F.normalize(self.model.encode_image(pixels.to(self.device)).float(), dim=-1)
            for feature, cls_name in zip(features, classes[start : start + self.batch_size], strict=True):
                out.append(LOGIT_SCALE * feature @ self.text_classifier(cls_name))
        return torch.stack(out).cpu() if out else torch.zeros(0, len(COLORS))

    def classify(self, items: Sequence[tuple[np.ndarray, str, Detection]]) -> list[str]:
        """Colour name of each ``(image HWC uint8, class, detection)``, all crops in shared CLIP batches."""
        crops = [color_crop(image, det.box, det.mask) for image, _, det in items]
        logits = self.logits(crops, [cls_name for _, cls_name, _ in items])
        return [COLORS[i] for i in logits.argmax(dim=1).tolist()]


def load_clip(path: Path, *, model_name: str, **model_kwargs: Any) -> torch.nn.Module:
    """CLIP weights from a local file into open_clip's ``model_name`` architecture, on the CPU in fp32."""
    import open_clip

    if _is_torchscript(path):
        # OpenAI's original release; open_clip rebuilds a plain module from its state dict.
        return open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
    return open_clip.create_model(model_name, pretrained=str(path), **model_kwargs)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``constants.pkl``; ``torch.save`` zips have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())
