"""How far the reward models' upstream preprocessings are from one another, in grey levels.

Each scorer follows one upstream order exactly (tests/test_scorer_*.py); other upstreams of the same model
order or round differently. This measures each known difference on the images a trainer sends (512²) and
on odd, tall and wide sizes, for a smooth picture with detail and for pixel noise (the worst case for
resize overshoot). A grey level is 1/255 of the [0, 1] range, i.e. |Δ normalised pixel| · std · 255.

* HPSv2.1 — HPSv2's order (``ToTensor`` then torchvision bicubic on the float tensor; ours) vs mainline
  open_clip's (PIL bicubic on uint8, then ``ToTensor``).
* Aesthetic — transformers' CLIP processor crop (offset ``margin // 2``; ours, as DiffusionNFT) vs OpenAI
  CLIP's ``CenterCrop`` (``round(margin / 2)``, half to even), which LAION's own inference runs.
* PickScore / aesthetic — transformers' PIL backend (ours) vs its default torchvision backend in
  transformers 5 (antialiased bicubic on the uint8 tensor, rounded once).
* Pillow pass order — the classic horizontal-then-vertical order (ours) vs the installed Pillow, which from
  version 13 runs the vertical pass first on some tall images.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import open_clip
import PIL
import torch
from PIL import Image
from torchvision import transforms as T
from transformers.models.clip import CLIPImageProcessor, CLIPImageProcessorPil

from bench.common import print_table, write_results
from services.clip_shared.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    center_crop_transform,
    pad_transform,
)

SIZES = ((512, 512), (150, 200), (200, 150), (224, 227), (224, 231), (1023, 333), (600, 229))
"""(height, width): the trainer's 512², down- and upscaled odd sizes, crop margins ≡ 3 mod 4, tall ones."""

CLIP_PROCESSOR = {
    "crop_size": 224,
    "size": {"shortest_edge": 224},
    "do_center_crop": True,
    "do_resize": True,
    "do_normalize": True,
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
    "resample": 3,
}
"""PickScore's and openai/clip-vit-large-patch14's processor settings (they coincide)."""

Pixels = Callable[[np.ndarray], torch.Tensor]


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth pattern with fine detail and mild noise: closer to a generated sample than noise is."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = (
        128
        + 90 * np.sin(xx / 5.0)[..., None] * np.cos(yy / 7.0)[..., None]
        + 30 * np.sin(xx * yy / 900.0)[..., None]
    )
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None]


def grey_levels(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max, mean) |a − b| in grey levels for two normalised (3, 224, 224) images."""
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    levels = ((a - b) * std * 255.0).abs()
    return float(levels.max()), float(levels.mean())


def comparisons() -> dict[str, tuple[Pixels, Pixels]]:
    """name → (ours, the other upstream), each (H, W, 3) uint8 → (3, 224, 224) normalised."""
    mainline = open_clip.image_transform(
        224, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resize_mode="longest"
    )
    openai_clip = T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )
    pil_backend = CLIPImageProcessorPil(**CLIP_PROCESSOR)
    torchvision_backend = CLIPImageProcessor(**CLIP_PROCESSOR)

    def hps(image: np.ndarray) -> torch.Tensor:
        return pad_transform(as_tensor(image))[0]

    def clip(image: np.ndarray) -> torch.Tensor:
        return center_crop_transform(as_tensor(image))[0]

    def installed_pillow(image: np.ndarray) -> torch.Tensor:
        out = pil_backend(images=image, return_tensors="np", input_data_format="channels_last")
        return torch.from_numpy(out["pixel_values"][0])

    def torchvision_processor(image: np.ndarray) -> torch.Tensor:
        return torchvision_backend(images=as_tensor(image)[0], return_tensors="pt")["pixel_values"][0]

    return {
        "hps: HPSv2 order vs mainline open_clip": (hps, lambda image: mainline(Image.fromarray(image))),
        "aesthetic: processor crop vs OpenAI CLIP crop": (
            clip,
            lambda image: openai_clip(Image.fromarray(image)),
        ),
        "clip: PIL vs torchvision processor backend": (clip, torchvision_processor),
        f"clip: classic pass order vs Pillow {PIL.__version__}": (clip, installed_pillow),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.preprocessing", description=__doc__.splitlines()[0]
    )
    parser.parse_args(argv)
    rows, results = [], []
    for name, (ours, other) in comparisons().items():
        for height, width in SIZES:
            for kind, make in (("picture", picture), ("noise", noise)):
                image = make(height, width)
                worst, mean = grey_levels(ours(image), other(image))
                rows.append([name, f"{height}x{width}", kind, worst, mean])
                results.append(
                    {
                        "comparison": name,
                        "height": height,
                        "width": width,
                        "image": kind,
                        "max_levels": worst,
                        "mean_levels": mean,
                    }
                )
    print_table(
        "Pixel difference between upstream preprocessings (grey levels, 224² model input)",
        ["comparison", "size", "image", "max", "mean"],
        rows,
        digits=3,
    )
    write_results("preprocessing", {"pillow": PIL.__version__, "comparisons": results})


if __name__ == "__main__":
    main()
