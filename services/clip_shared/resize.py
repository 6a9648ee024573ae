"""PIL's bicubic resize of uint8 images, reproduced bit for bit with two matrix products.

Every reference pipeline of the CLIP-family rewards resizes a *PIL image*: transformers' CLIP processor
(PickScore, the aesthetic predictor), open_clip's eval transform (HPSv2), OpenAI CLIP's ``Resize``. PIL
resamples separably — horizontal pass first, then vertical — each output pixel a weighted sum of input pixels
under the bicubic kernel (a = −0.5) widened by the downscale factor (the widening is PIL's antialiasing), with
weights in 22-bit fixed point, and rounds each pass back to uint8.

``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` uses the same kernel but keeps the
intermediate pass in float; because bicubic overshoots, that differs from PIL by up to ~12 grey levels on
detailed images. Here each pass is a product with PIL's own integer weights followed by PIL's rounding, so the
output equals ``Image.resize(..., Image.BICUBIC)`` exactly (Pillow ``libImaging/Resample.c``:
``precompute_coeffs``, ``normalize_coeffs_8bpc``, ``ImagingResampleHorizontal_8bpc``, ``clip8``). The products
run in float64, where every partial sum is an integer below 2**53 and therefore exact on CPU and GPU alike.

Pass order: Pillow up to 12.x always runs the horizontal pass first — the Pillow the reward models were scored
and trained with. Pillow 13 runs the vertical pass first when the height shrinks much more than the width
(python-pillow/Pillow#9549), which moves a few pixels of such tall images by a few levels; we keep the classic
order, so results do not depend on which Pillow is installed.
"""

from __future__ import annotations

import functools

import torch

PRECISION_BITS = 32 - 8 - 2
"""Pillow's fixed-point precision for 8-bit images (``PRECISION_BITS`` in Resample.c)."""
BICUBIC_A = -0.5
"""Keys' cubic parameter in Pillow's bicubic filter (OpenCV and torch's non-antialiased path use −0.75)."""
BICUBIC_SUPPORT = 2.0


def _bicubic(x: float) -> float:
    """Pillow's ``bicubic_filter``, term for term (the coefficients must round as Pillow's do)."""
    x = abs(x)
    if x < 1.0:
        return ((BICUBIC_A + 2.0) * x - (BICUBIC_A + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * BICUBIC_A
    return 0.0


@functools.lru_cache(maxsize=128)
def _weights(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) float64 matrix of Pillow's fixed-point bicubic weights (integers)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filter_scale
    inv_filter_scale = 1.0 / filter_scale
    one = float(1 << PRECISION_BITS)
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for out_index in range(out_size):
        center = (out_index + 0.5) * scale
        # int() truncates toward zero, as the C casts do.
        first = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), in_size)
        taps = [_bicubic((x - center + 0.5) * inv_filter_scale) for x in range(first, stop)]
        total = 0.0
        for tap in taps:  # sequential sum, as in C: the normalisation must round identically
            total += tap
        for offset, tap in enumerate(taps):
            normalised = tap / total if total != 0.0 else tap
            fixed = int(normalised * one + (0.5 if normalised >= 0 else -0.5))
            weights[out_index, first + offset] = fixed
    return weights


def _to_uint8_levels(accumulated: torch.Tensor) -> torch.Tensor:
    """Pillow's ``clip8``: add half a unit, shift out the fraction, clamp to [0, 255] (still float64)."""
    half = float(1 << (PRECISION_BITS - 1))
    return torch.floor((accumulated + half) / float(1 << PRECISION_BITS)).clamp_(0, 255)


def resize_bicubic(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (B, C, H, W) uint8 images to (B, C, height, width) uint8 exactly as PIL's BICUBIC does.

    A dimension that keeps its size is left untouched, as in PIL (its weights would be the identity anyway).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    in_height, in_width = images.shape[-2:]
    if (in_height, in_width) == (height, width):
        return images
    x = images.to(torch.float64)
    if width != in_width:
        horizontal = _weights(in_width, width).to(x.device)
        x = _to_uint8_levels(x @ horizontal.T)
    if height != in_height:
        vertical = _weights(in_height, height).to(x.device)
        x = _to_uint8_levels(vertical @ x)
    return x.to(torch.uint8)
