"""Per-group diversity measures: DINOv3 feature spread and DivGenBench's Photographic Variance Score.

All statistics are over the images of one prompt group. Standard deviations are population stds (ddof = 0):
the spread of the images that were generated, not an estimate for a larger population.
"""

from __future__ import annotations

import torch

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 grey level, the conversion of PIL ``convert('L')`` and OpenCV ``COLOR_RGB2GRAY``."""


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """(n, d) → (n, n) matrix of 1 − cos(f_i, f_j) in float64, clamped to [0, 2] against rounding."""
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    return (1.0 - unit @ unit.T).clamp(0.0, 2.0)


def mean_distance_to_others(distances: torch.Tensor) -> torch.Tensor:
    """(n, n) → (n,): each member's mean distance to the other n − 1; 0 for a group of one.

    The mean of this vector equals :func:`mean_pairwise_distance`, so a per-sample value averages to the
    group's diversity.
    """
    n = distances.shape[0]
    if n < 2:
        return torch.zeros(n, dtype=distances.dtype)
    off_diagonal = distances.sum(dim=1) - distances.diagonal()
    return off_diagonal / (n - 1)


def mean_pairwise_distance(distances: torch.Tensor) -> float:
    """Mean of 1 − cos over the n(n−1)/2 unordered pairs i < j; 0.0 for a group of one (no pair differs)."""
    n = distances.shape[0]
    if n < 2:
        return 0.0
    upper = torch.triu_indices(n, n, offset=1)
    return float(distances[upper[0], upper[1]].mean())


def photo_statistics(image: torch.Tensor) -> tuple[float, float, float]:
    """(3, H, W) uint8 RGB → (mean HSV saturation, mean HSV value, std of grey level), all on [0, 1].

    HSV is the hexcone model: V = max(R, G, B), S = (max − min) / max with S = 0 where max = 0.
    """
    rgb = image.double() / 255.0
    high = rgb.max(dim=0).values
    low = rgb.min(dim=0).values
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-12), torch.zeros_like(high))
    weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64).view(3, 1, 1)
    grey = (rgb * weights).sum(dim=0)
    return float(saturation.mean()), float(high.mean()), float(grey.std(correction=0))


def photographic_variance_score(images: list[torch.Tensor]) -> float:
    """DivGenBench PVS of a group: std_i(mean S_i) + std_i(mean V_i) + std_i(grey std_i); 0 for one image."""
    stats = torch.tensor([photo_statistics(image) for image in images], dtype=torch.float64)
    return float(stats.std(dim=0, correction=0).sum())
