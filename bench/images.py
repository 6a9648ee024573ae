"""Synthetic 512² test images with the statistics of generated pictures, for the serving benchmarks.

Uniform noise would be unfair to JPEG (it does not compress) and flat colour unfair to raw transport (JPEG
would shrink it to nothing). Generated images are smooth regions with edges and fine texture, so each image
here is a low-frequency colour field with mid-frequency texture, a few hard-edged discs and boxes, and mild
pixel noise. At quality 75
these encode to roughly what SD3 outputs at 512² do (tens of kB).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 512


def synthetic_images(count: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """(count, size, size, 3) uint8 images, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(count, 3, 6, 6)).astype(np.float32))
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).numpy()
    detail = torch.from_numpy(rng.normal(0, 24, size=(count, 3, 128, 128)).astype(np.float32))
    texture = F.interpolate(detail, size=(size, size), mode="bilinear", align_corners=False).numpy()
    images = (field + texture).transpose(0, 2, 3, 1)
    yy, xx = np.mgrid[0:size, 0:size]
    for image in images:
        for _ in range(rng.integers(3, 7)):
            colour = rng.uniform(0, 255, size=3)
            cx, cy = rng.uniform(0, size, size=2)
            radius = rng.uniform(size / 16, size / 5)
            if rng.random() < 0.5:
                inside = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
            else:
                inside = (abs(xx - cx) < radius) & (abs(yy - cy) < radius * rng.uniform(0.4, 1.0))
            image[inside] = colour
    images = images + rng.normal(0, 4.0, size=images.shape)
    return np.clip(np.round(images), 0, 255).astype(np.uint8)
