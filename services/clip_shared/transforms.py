"""The two CLIP image transforms the rewards use, on batches of uint8 tensors.

* ``center_crop_transform`` — transformers' ``CLIPImageProcessor`` (PickScore's ViT-H processor, the aesthetic
  predictor's ViT-L/14 processor), which resizes a PIL image: shortest side → 224 with PIL bicubic, the long
  side to ``int(224 · long / short)`` (truncated: ``get_resize_output_image_size``), centre crop 224 with the
  offset rounded down (``(H − 224) // 2``), /255, OpenAI mean/std. The resized image is quantised to uint8
  before /255, as PIL's is (``services.clip_shared.resize``).
* ``pad_transform`` — HPSv2's eval transform (HPSv2 ``hpsv2/src/open_clip/transform.py``,
  ``image_transform(..., resize_longest_max=True)``), in its order: convert to RGB, ``ToTensor()`` (/255, a
  float tensor), ``ResizeMaxSize(224)`` — torchvision's bicubic *on that float tensor*, antialiased (the
  default since torchvision 0.17), neither rounded nor clipped, longest side → 224 and the short side to
  ``round(short · 224 / long)`` — then a zero pad to 224² with the smaller half on the left/top, then OpenAI
  mean/std. The pad is 0 *before* normalisation, so padded pixels become −mean/std. This is not mainline
  open_clip's order (PIL resize first, then ``ToTensor``): that differs by up to ~10 grey levels.

Images of one size go through together; mixed sizes are grouped by size and put back in input order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from services.clip_shared.resize import resize_bicubic

IMAGE_SIZE = 224
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGES_PER_TRANSFORM = 8
"""Images resized together at most (bounds the float64 working memory of the exact PIL resize)."""

UInt8Transform = Callable[[torch.Tensor], torch.Tensor]


def shortest_side_size(height: int, width: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(height, width) after transformers' ``shortest_edge`` resize: short side = size, long truncated."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def longest_side_size(height: int, width: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(height, width) after HPSv2's ``ResizeMaxSize``: long side = size, short side rounded (at least 1)."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_and_center_crop(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, 3, H, W) uint8 → (B, 3, size, size) uint8, as ``CLIPImageProcessor`` resizes and crops."""
    height, width = shortest_side_size(*images.shape[-2:], size=size)
    resized = resize_bicubic(images, height, width)
    top, left = (height - size) // 2, (width - size) // 2
    return resized[..., top : top + size, left : left + size]


def resize_max_size(pixels: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] → (B, 3, size, size) float, as HPSv2's ``ResizeMaxSize`` on a tensor.

    torchvision's antialiased bicubic on the float tensor (overshoot kept), then a zero pad. HPSv2 skips both
    when the long side is already ``size``, which would hand its model a non-square image; here such an
    image is left unresized (as there) and padded, so every image ends up square (the only input the ViT
    accepts).
    """
    height, width = longest_side_size(*pixels.shape[-2:], size=size)
    if (height, width) != tuple(pixels.shape[-2:]):
        pixels = TF.resize(pixels, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = size - height, size - width
    return F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 in [0, 1], as torchvision's ``ToTensor`` divides."""
    return images.to(torch.float32).div(255.0)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] → ``(x − mean) / std`` with OpenAI CLIP's mean/std."""
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def center_crop_transform(images: torch.Tensor) -> torch.Tensor:
    return normalize(to_unit(resize_and_center_crop(images)))


def pad_transform(images: torch.Tensor) -> torch.Tensor:
    return normalize(resize_max_size(to_unit(images)))


def preprocess_batch(
    images: Sequence[torch.Tensor], transform: UInt8Transform, device: str | torch.device
) -> torch.Tensor:
    """Apply ``transform`` to (3, H, W) uint8 images of any sizes; returns (B, 3, 224, 224) float32.

    Images are moved to ``device`` as uint8 (4x less traffic than float) and transformed one size group at a
    time, so same-sized generations share their matrix products. Groups go in chunks of
    :data:`IMAGES_PER_TRANSFORM`: the exact resize holds its input in float64 (8 bytes a value), which for
    32 images of 1024² would be 800 MB.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected (3, H, W) uint8 images, got {tuple(image.shape)} {image.dtype}")
        groups.setdefault(tuple(image.shape), []).append(index)
    out = torch.empty(len(images), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float32, device=device)
    for indices in groups.values():
        for start in range(0, len(indices), IMAGES_PER_TRANSFORM):
            chunk = indices[start : start + IMAGES_PER_TRANSFORM]
            stacked = torch.stack([images[i] for i in chunk]).to(device)
            out[torch.tensor(chunk, device=device)] = transform(stacked)
    return out


def check_center_crop_config(config: Mapping[str, Any], *, source: str) -> None:
    """Refuse a checkpoint whose ``preprocessor_config.json`` declares other preprocessing than
    :func:`center_crop_transform` implements (it would otherwise be scored with the wrong pixels)."""
    size = config.get("size", IMAGE_SIZE)
    shortest = size if isinstance(size, int) else size.get("shortest_edge")
    crop = config.get("crop_size", IMAGE_SIZE)
    crop_hw = (crop, crop) if isinstance(crop, int) else (crop.get("height"), crop.get("width"))
    expected: dict[str, tuple[Any, Any]] = {
        "size (shortest edge)": (shortest, IMAGE_SIZE),
        "crop_size": (crop_hw, (IMAGE_SIZE, IMAGE_SIZE)),
        "resample (3 = bicubic)": (config.get("resample", 3), 3),
        "do_resize": (config.get("do_resize", True), True),
        "do_center_crop": (config.get("do_center_crop", True), True),
        "do_normalize": (config.get("do_normalize", True), True),
        "do_rescale": (config.get("do_rescale", True), True),
    }
    for name, (got, want) in expected.items():
        if got != want:
            raise ValueError(f"{source}: preprocessing {name} is {got!r}, this scorer implements {want!r}")
    rescale = float(config.get("rescale_factor", 1 / 255))
    mean = tuple(config.get("image_mean", OPENAI_CLIP_MEAN))
    std = tuple(config.get("image_std", OPENAI_CLIP_STD))
    if (
        abs(rescale - 1 / 255) > 1e-12
        or not _close(mean, OPENAI_CLIP_MEAN)
        or not _close(std, OPENAI_CLIP_STD)
    ):
        raise ValueError(
            f"{source}: rescale/mean/std are {rescale}, {mean}, {std}; this scorer implements "
            f"1/255, {OPENAI_CLIP_MEAN}, {OPENAI_CLIP_STD}"
        )


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-7 for x, y in zip(a, b, strict=True))
