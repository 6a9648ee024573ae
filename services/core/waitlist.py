"""Places kept for requests refused because the whole server queue was full.

Without them a refused request competes again on retry with every other client's next request, and
closed-loop clients, which send their next request the moment they are answered, take the room a batch
frees before any retry arrives: on a 2-core machine one request needed 86 tries under 16 clients, and
p99 latency was 300x the quiet p99. A refusal therefore takes a place in line, per client, holding the
number of images it asked for: room that frees goes to the places in the order they were taken, and a
request from anyone else is admitted only into room no earlier place is waiting for.

A place lapses if its client does not come back within its retry hint plus ``grace_s`` (it gave up, or
its deadline passed), so a departed client blocks its room for at most that long. A place is keyed by
the caller: either the client (all of its calls share one place, and whichever is admitted first uses
it up) or one call of the client, named by the ticket its refusal carried. A shared place fails a
client with several calls in flight: each admitted call sends its siblings to the back of the line (16
clients with 3 calls each, idle 2-core machine: one request needed 52-102 tries; 48 clients with one
call each: 3). A call keeps its place while a refusal for its own client's full queue makes it wait
(:meth:`Waitlist.keep`), since that is its siblings' work, not a lapse. Only a named place is kept: a
shared place goes to whichever of the client's calls is admitted first, so keeping it on behalf of the
call that met the full client queue would hand it to a sibling instead (a client without tickets then
waits like a new caller, as before places existed).

The places together hold at most ``capacity`` images; a refusal past that takes no place. The bound
must exceed what every call refused at once asks for: with a line of one 48-image queue, 16 clients
× 3 calls left a third of the refused calls without a place, to retry at random, and one request
needed 33 tries; with the line unbounded in practice, 7-13 (docs/reliability.md). Names made up by a
caller without a token can hold places only until they lapse.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Place:
    images: int
    expires: float


class Waitlist:
    """Places waiting for room in the server queue, first refused first served; a place's key
    names a client or one call of a client (:func:`services.core.batcher._place`)."""

    def __init__(self, grace_s: float, capacity: int) -> None:
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        self.grace_s = grace_s
        self.capacity = capacity
        self._places: dict[str, _Place] = {}  # insertion order is the order in line

    def ahead_of(self, key: str | None, now: float) -> int:
        """Images held for the places ahead of ``key``'s (all of them if it holds none)."""
        self._expire(now)
        images = 0
        for holder, place in self._places.items():
            if holder == key:
                break
            images += place.images
        return images

    def hold(self, key: str, images: int, retry_after_s: float, now: float) -> bool:
        """Keep (or take, at the back) ``key``'s place for ``images`` until its retry is due; False
        when there is no room in line for a new place."""
        expires = now + retry_after_s + self.grace_s
        place = self._places.get(key)
        if place is None:
            if sum(p.images for p in self._places.values()) + images > self.capacity:
                return False
            self._places[key] = _Place(images, expires)
        else:  # a retry that is refused again keeps its place in line
            place.images = max(place.images, images)
            place.expires = max(place.expires, expires)
        return True

    def keep(self, key: str, retry_after_s: float, now: float) -> bool:
        """Extend ``key``'s place, if it still has one, until its retry is due; whether it had one."""
        self._expire(now)
        place = self._places.get(key)
        if place is not None:
            place.expires = max(place.expires, now + retry_after_s + self.grace_s)
        return place is not None

    def release(self, key: str) -> None:
        """The place's caller was admitted: its place is used up."""
        self._places.pop(key, None)

    def __len__(self) -> int:
        return len(self._places)

    def _expire(self, now: float) -> None:
        for key in [k for k, p in self._places.items() if p.expires <= now]:
            del self._places[key]
