"""Online model of what a batch costs the served model: t(n) ≈ fixed + per_image·n.

The batcher learns it from the batches it runs, so the same code sizes batches for a CPU (cost almost
proportional to n: small batches lose nothing) and a GPU (a large fixed cost: small batches waste it)
without being told which it runs on. Recent batches weigh more (exponential forgetting), so the fit
follows a model whose speed changes (warm-up, a co-tenant on the device).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LinearCost:
    """t(n) = fixed_s + per_image_s·n, both ≥ 0."""

    fixed_s: float
    per_image_s: float

    def seconds(self, num_images: int) -> float:
        return self.fixed_s + self.per_image_s * num_images

    def largest_batch_within(self, seconds: float, max_images: int) -> int:
        """Largest n ≤ max_images with t(n) ≤ seconds (at least 1)."""
        if self.per_image_s <= 0:
            return max_images
        return max(1, min(max_images, int((seconds - self.fixed_s) / self.per_image_s)))


class BatchCostModel:
    """Exponentially weighted least-squares fit of batch seconds against batch images."""

    def __init__(self, forgetting: float = 0.95) -> None:
        if not 0 < forgetting <= 1:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        self.forgetting = forgetting
        self._w = self._n = self._t = self._nn = self._nt = 0.0

    def observe(self, num_images: int, seconds: float) -> None:
        f = self.forgetting
        self._w = f * self._w + 1.0
        self._n = f * self._n + num_images
        self._t = f * self._t + seconds
        self._nn = f * self._nn + num_images * num_images
        self._nt = f * self._nt + num_images * seconds

    def fit(self) -> LinearCost | None:
        """The current fit; None before the first batch.

        With a single batch size seen, the split between fixed and per-image cost is unknown and the
        cost is taken as proportional to n — the assumption under which smaller batches keep latency
        lowest, so a fresh server errs towards protecting small clients, not towards throughput.
        """
        if self._w == 0:
            return None
        mean_n, mean_t = self._n / self._w, self._t / self._w
        var_n = self._nn / self._w - mean_n * mean_n
        if var_n <= 1e-9 * max(mean_n * mean_n, 1.0):
            return LinearCost(0.0, mean_t / mean_n if mean_n > 0 else 0.0)
        slope = (self._nt / self._w - mean_n * mean_t) / var_n
        if slope <= 0:  # bigger batches measured no slower: all cost is fixed
            return LinearCost(mean_t, 0.0)
        intercept = mean_t - slope * mean_n
        if intercept < 0:  # fit through the origin instead: a batch cannot cost less than nothing
            return LinearCost(0.0, self._nt / self._nn)
        return LinearCost(intercept, slope)
