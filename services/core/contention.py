"""Which clients contend for one model, and how large a batch may be while they do.

A batch is never preempted, so a client sending one small request at a time (*light*: an evaluation
job, a human) waits for whatever batch is running when its request arrives, then for the batch its
request runs in. Fair ordering puts its request first, but while a *heavy* client (a flood: several
requests waiting at once, or more than a full batch) fills every batch to the maximum, both waits are
full batches. This module keeps batches that hold heavy work short while a light client is active:
at most the size whose predicted run time is (1 + slack) × that of the smallest light request alone.

A client is active while it has requests in flight and for ``window_s`` after its last answer (so a
client preparing its next request counts); a client is heavy from the moment it shows heavy
traffic until ``window_s`` after it is next seen with nothing queued. A flood whose backlog has shrunk
to its last, part-served request is still a flood: with its work merged freely, a batch would carry that
backlog whole (20-odd images) next to the light client's four.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.core.batch_cost import LinearCost


@dataclass(frozen=True, slots=True)
class ContentionLimit:
    """Work of ``heavy`` clients joins a batch only while the batch stays ≤ ``heavy_batch_images``."""

    heavy: frozenset[str]
    heavy_batch_images: int


class ContentionTracker:
    """Per-client activity, fed by the batcher; pure bookkeeping, no clock of its own."""

    def __init__(self, *, slack: float, window_s: float, max_batch_images: int) -> None:
        self.slack = slack
        self.window_s = window_s
        self.max_batch_images = max_batch_images
        self._in_flight: dict[str, int] = {}
        self._request_images: dict[str, int] = {}  # each client's latest request
        self._last_answer: dict[str, float] = {}
        self._backlogged: set[str] = set()  # showed heavy traffic, not seen drained since
        self._heavy_until: dict[str, float] = {}  # drained: heavy for window_s more

    def request_started(self, client: str, num_images: int, queued_images: int, now: float) -> None:
        self._in_flight[client] = self._in_flight.get(client, 0) + 1
        self._request_images[client] = num_images
        self._note_heavy(client, queued_images, now)

    def request_finished(self, client: str, now: float) -> None:
        left = self._in_flight.get(client, 0) - 1
        if left > 0:
            self._in_flight[client] = left
        else:
            self._in_flight.pop(client, None)
        self._last_answer[client] = now

    def limit(
        self, queued_images: dict[str, int], cost: Callable[[], LinearCost | None], now: float
    ) -> ContentionLimit:
        """The limit for the batch formed now; no limit without both a heavy and a light client.

        ``cost`` gives the batch cost model's current fit (None before any batch ran); it is asked only
        while clients contend.
        """
        self._forget(now)
        active = set(self._in_flight) | set(self._last_answer)
        for client in active:
            self._note_heavy(client, queued_images.get(client, 0), now)
        heavy = frozenset(c for c in active if c in self._backlogged or self._heavy_until.get(c, -1.0) >= now)
        light = active - heavy
        fit = cost() if heavy and light else None
        if fit is None:
            return ContentionLimit(frozenset(), self.max_batch_images)
        smallest = min(self._request_images[c] for c in light)
        budget_s = (1.0 + self.slack) * fit.seconds(smallest)
        return ContentionLimit(heavy, fit.largest_batch_within(budget_s, self.max_batch_images))

    def _note_heavy(self, client: str, queued_images: int, now: float) -> None:
        if self._in_flight.get(client, 0) >= 2 or queued_images > self.max_batch_images:
            self._backlogged.add(client)
        elif queued_images == 0 and client in self._backlogged:
            self._backlogged.discard(client)
            self._heavy_until[client] = now + self.window_s

    def _forget(self, now: float) -> None:
        for client in [c for c, t in self._last_answer.items() if now - t > self.window_s]:
            del self._last_answer[client]
        for client in [c for c, t in self._heavy_until.items() if t < now]:
            del self._heavy_until[client]
        known = set(self._in_flight) | set(self._last_answer)
        self._backlogged &= known
        for client in [c for c in self._request_images if c not in known]:
            del self._request_images[client]
