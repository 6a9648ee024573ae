"""Per-client quotas: a token bucket in images per second for each client.

The fair batcher shares the model between backlogged clients; a quota caps what one client may take
even when the model is idle, so a team's share of a GPU can be sold (or protected) independently of
who else is busy. Knows nothing about gRPC; the servicer answers a refusal RESOURCE_EXHAUSTED with
``retry_after_s`` as the hint.

A client's bucket holds ``burst_s`` seconds of its rate. A request larger than the whole bucket is
admitted once the bucket is full and leaves it in debt, so every legal request size can pass while the
long-run rate still never exceeds the quota.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class QuotaConfig:
    """Server-wide quota defaults; the token file may set a rate per team (see services.core.auth)."""

    images_per_s: float | None = None
    """Default rate of every client; None = unlimited unless the token file gives the client a rate."""
    burst_s: float = 1.0
    """Bucket size in seconds of the client's rate: how far a client may run ahead after idling."""

    def __post_init__(self) -> None:
        if self.images_per_s is not None and not (math.isfinite(self.images_per_s) and self.images_per_s > 0):
            raise ValueError(f"quota images_per_s must be a positive number or None, got {self.images_per_s}")
        if not (math.isfinite(self.burst_s) and self.burst_s > 0):
            raise ValueError(f"quota burst_s must be > 0, got {self.burst_s}")


class QuotaExceeded(Exception):
    """The client used up its quota; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Bucket:
    rate: float
    capacity: float
    tokens: float
    updated: float


class QuotaLimiter:
    """Token buckets keyed by client; thread-safe, constant memory per active client."""

    MAX_IDLE_BUCKETS = 1024
    """Full buckets are forgotten past this many clients: a full bucket equals a fresh one, and an open
    server would otherwise keep one per peer address forever."""

    def __init__(self, config: QuotaConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def charge(self, client: str, num_images: int, rate: float | None = None) -> None:
        """Take ``num_images`` from the client's bucket or raise QuotaExceeded (taking nothing).

        ``rate`` is the client's own quota (from the token file); None falls back to the default.
        """
        rate = rate if rate is not None else self.config.images_per_s
        if rate is None or num_images <= 0:
            return
        with self._lock:
            now = self._clock()
            bucket = self._refill(client, rate, now)
            needed = min(float(num_images), bucket.capacity)
            if bucket.tokens < needed:
                wait = (needed - bucket.tokens) / rate
                raise QuotaExceeded(
                    f"client quota of {rate:g} images/s used up: {num_images} images requested, "
                    f"{max(bucket.tokens, 0.0):.1f} available now",
                    wait,
                )
            bucket.tokens -= num_images

    def refund(self, client: str, num_images: int) -> None:
        """Give back images of a request that never reached the model (refused by the queue, invalid)."""
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is not None:
                bucket.tokens = min(bucket.capacity, bucket.tokens + num_images)

    def num_clients(self) -> int:
        return len(self._buckets)

    def _refill(self, client: str, rate: float, now: float) -> _Bucket:
        capacity = max(rate * self.config.burst_s, 1.0)
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.MAX_IDLE_BUCKETS:
                self._forget_full(now)
            bucket = self._buckets[client] = _Bucket(rate, capacity, capacity, now)
            return bucket
        bucket.rate, bucket.capacity = rate, capacity
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        return bucket

    def _forget_full(self, now: float) -> None:
        for client in list(self._buckets):
            b = self._buckets[client]
            if b.tokens + (now - b.updated) * b.rate >= b.capacity:
                del self._buckets[client]
