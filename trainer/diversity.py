"""Diversity of the samples of one prompt, for worlds where a feature model would be meaningless.

- ``pixel_diversity``: mean pairwise RMS distance between images in [0, 1].
- ``layout_diversity``: DivGenBench's SDI idea with an exact detector: 1 − mean over image pairs of the
  Hungarian-matched IoU between their object boxes (unmatched boxes count as IoU 0, normalised by the
  larger box count), so identical layouts give 0 and disjoint layouts give 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

Box = tuple[float, float, float, float]


def pixel_diversity(images: torch.Tensor) -> float:
    """images (n, 3, H, W) uint8 → mean over pairs of sqrt(mean((a − b)²)) on [0, 1]; 0 for n < 2."""
    if len(images) < 2:
        return 0.0
    flat = images.reshape(len(images), -1).double() / 255.0
    dist = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    upper = torch.triu_indices(len(images), len(images), offset=1)
    return float(dist[upper[0], upper[1]].mean())


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 4) × (m, 4) xyxy boxes → (n, m) IoU."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def layout_similarity(a: Sequence[Box], b: Sequence[Box]) -> float:
    """Hungarian-matched mean IoU between two images' boxes; 1 when both are empty."""
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    iou = box_iou(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    rows, cols = linear_sum_assignment(-iou)
    return float(iou[rows, cols].sum() / max(len(a), len(b)))


def layout_diversity(layouts: Sequence[Sequence[Box]]) -> float:
    """1 − mean pairwise layout similarity over the images of one prompt; 0 for fewer than two images."""
    pairs = list(combinations(range(len(layouts)), 2))
    if not pairs:
        return 0.0
    return 1.0 - float(np.mean([layout_similarity(layouts[i], layouts[j]) for i, j in pairs]))
