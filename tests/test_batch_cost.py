"""The batch cost model against numpy's weighted least squares, and its fall-backs."""

from __future__ import annotations

import numpy as np
import pytest

from services.core.batch_cost import BatchCostModel, LinearCost


def test_fit_is_exponentially_weighted_least_squares() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 33, 40)
    seconds = 0.02 + 0.03 * sizes + rng.normal(0, 0.004, 40)
    model = BatchCostModel(forgetting=0.9)
    for n, t in zip(sizes, seconds, strict=True):
        model.observe(int(n), float(t))
    weights = 0.9 ** np.arange(len(sizes))[::-1]  # the latest batch weighs 1
    slope, intercept = np.polyfit(sizes, seconds, 1, w=np.sqrt(weights))
    fit = model.fit()
    assert fit is not None
    assert fit.per_image_s == pytest.approx(slope, rel=1e-9)
    assert fit.fixed_s == pytest.approx(intercept, rel=1e-9)


def test_forgetting_follows_a_model_that_became_slower() -> None:
    model = BatchCostModel(forgetting=0.8)
    for _ in range(30):
        for n in (4, 32):
            model.observe(n, 0.01 * n)
    for _ in range(30):
        for n in (4, 32):
            model.observe(n, 0.05 + 0.02 * n)
    fit = model.fit()
    assert fit is not None
    assert fit.per_image_s == pytest.approx(0.02, rel=1e-3) and fit.fixed_s == pytest.approx(0.05, rel=1e-2)


def test_fall_backs_when_the_data_cannot_split_fixed_from_per_image_cost() -> None:
    assert BatchCostModel().fit() is None
    one_size = BatchCostModel(forgetting=1.0)
    for t in (0.30, 0.34):
        one_size.observe(8, t)
    assert one_size.fit() == LinearCost(0.0, pytest.approx(0.32 / 8))  # proportional: protects latency
    flat = BatchCostModel(forgetting=1.0)
    for n, t in ((4, 0.2), (32, 0.19)):
        flat.observe(n, t)
    assert flat.fit() == LinearCost(pytest.approx(0.195), 0.0)  # bigger was no slower: all fixed
    below_zero = BatchCostModel(forgetting=1.0)
    for n, t in ((2, 0.01), (4, 0.05)):  # the line through them crosses zero at n = 1.5
        below_zero.observe(n, t)
    fit = below_zero.fit()
    assert fit is not None and fit.fixed_s == 0.0
    assert fit.per_image_s == pytest.approx((2 * 0.01 + 4 * 0.05) / (4 + 16))  # through the origin


def test_largest_batch_within_a_time() -> None:
    cost = LinearCost(fixed_s=0.02, per_image_s=0.03)
    assert cost.seconds(4) == pytest.approx(0.14)
    assert cost.largest_batch_within(0.14, 32) == 4
    assert cost.largest_batch_within(0.1399, 32) == 3
    assert cost.largest_batch_within(0.001, 32) == 1  # never below one image
    assert cost.largest_batch_within(10.0, 32) == 32
    assert LinearCost(0.1, 0.0).largest_batch_within(0.1, 32) == 32
    with pytest.raises(ValueError, match="forgetting"):
        BatchCostModel(forgetting=0.0)
