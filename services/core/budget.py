"""A server-wide budget of decoded pixels: the memory bound of a reward server.

Queue limits count images, but an image may hold anything from a few hundred pixels to the per-image
limit (16.8 MP, 50 MB decoded), and a 50 KB PNG can declare that much. Every request therefore reserves
its images' pixels as it decodes them — after reading each header, before allocating — and gives them
back when it is answered, so decoded pixels held at once (decoding, queued, in the model) never exceed
the budget, whatever the mix of sizes. Decoding runs in worker threads, hence the lock.
"""

from __future__ import annotations

import threading

from services.core.codec import ImageError

DEFAULT_MAX_DECODED_PIXELS = 1 << 30
"""1.07 G pixels ≈ 3.2 GB as uint8 RGB: 4096 queued images of 512², the default queue bound's worth."""


class BudgetExhausted(Exception):
    """The server holds as many decoded pixels as it may; the request is refused, not queued.

    Deliberately not a ValueError: the decoder turns those into "cannot decode" answers.
    """


class PixelBudget:
    """Counts decoded pixels held by requests in flight, up to ``capacity``; with ``unit`` set, anything
    else requests hold (the server also counts the request bodies it buffers, in bytes)."""

    def __init__(self, capacity: int, unit: str = "decoded pixels") -> None:
        if capacity < 1:
            raise ValueError(f"{unit} budget must be >= 1, got {capacity}")
        self.capacity = capacity
        self.unit = unit
        self._used = 0
        self._lock = threading.Lock()

    def take(self, pixels: int) -> None:
        """Reserve ``pixels`` or raise BudgetExhausted (reserving nothing)."""
        with self._lock:
            if self._used + pixels > self.capacity:
                raise BudgetExhausted(
                    f"server memory budget full: {self._used} {self.unit} held + {pixels} > {self.capacity}"
                )
            self._used += pixels

    def release(self, pixels: int) -> None:
        with self._lock:
            self._used -= pixels
            assert self._used >= 0, "released more pixels than were taken"

    @property
    def used(self) -> int:
        return self._used


class Reservation:
    """The decoded pixels one request holds: within its own limit and the server's budget.

    ``take`` is the codec's reserve hook (called from the decoding thread); ``release`` gives everything
    back once the request is answered. A request cancelled while a thread is still decoding for it is
    closed first, so that thread can no longer take pixels that nobody would give back.
    """

    def __init__(self, budget: PixelBudget, max_pixels_per_request: int) -> None:
        self._budget = budget
        self._limit = max_pixels_per_request
        self._taken = 0
        self._closed = False
        self._lock = threading.Lock()

    def take(self, pixels: int) -> None:
        with self._lock:
            if self._closed:
                raise BudgetExhausted("the request ended while it was being decoded")
            if self._taken + pixels > self._limit:
                raise ImageError(
                    f"the request's images decode to more than {self._limit} pixels "
                    f"({self._taken} before this one of {pixels}); split it"
                )
            self._budget.take(pixels)
            self._taken += pixels

    def release(self) -> None:
        with self._lock:
            self._closed = True
            self._budget.release(self._taken)
            self._taken = 0
