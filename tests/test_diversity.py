"""Per-prompt diversity measures against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.diversity import layout_diversity, layout_similarity, pixel_diversity


def test_pixel_diversity_is_mean_pairwise_rms() -> None:
    a = torch.zeros(3, 2, 2, dtype=torch.uint8)
    b = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    c = torch.full((3, 2, 2), 51, dtype=torch.uint8)  # 0.2
    # pairs: (a,b) = 1.0, (a,c) = 0.2, (b,c) = 0.8 → mean 2/3
    assert pixel_diversity(torch.stack([a, b, c])) == pytest.approx(2 / 3)
    assert pixel_diversity(torch.stack([a])) == 0.0


def test_layout_similarity_matches_boxes_optimally() -> None:
    one = [(0, 0, 2, 2), (4, 4, 6, 6)]
    swapped = [(4, 4, 6, 6), (0, 0, 2, 2)]
    assert layout_similarity(one, swapped) == pytest.approx(1.0)  # order does not matter
    shifted = [(1, 0, 3, 2)]  # IoU with (0,0,2,2): inter 2, union 6 → 1/3; normalised by max(2, 1)
    assert layout_similarity(one, shifted) == pytest.approx((1 / 3) / 2)
    assert layout_similarity([], []) == 1.0
    assert layout_similarity(one, []) == 0.0


def test_layout_diversity_is_one_minus_mean_pairwise_similarity() -> None:
    a = [(0, 0, 2, 2)]
    b = [(1, 0, 3, 2)]
    c = [(10, 10, 12, 12)]
    # similarities: (a,b) = 1/3, (a,c) = 0, (b,c) = 0 → diversity 1 − 1/9
    assert layout_diversity([a, b, c]) == pytest.approx(1 - 1 / 9)
    assert layout_diversity([a]) == 0.0
    assert math.isclose(layout_diversity([a, a]), 0.0, abs_tol=1e-12)
