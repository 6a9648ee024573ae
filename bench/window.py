"""The measurement window of a closed-loop benchmark cell: N clients, each with one request in flight.

The window opens at the answer that completes warm-up (every client has had one: connections set up,
model warm, queues in their steady state) and closes at an answer of the *same client* once it has
lasted ``duration_s`` and every client has had ``min_requests`` answers inside it (or at any answer
after ``max_s``). Throughput counts images answered inside the window; latency is taken over requests
sent and answered inside it.

Closing on the opening client's answer matters when answers come in lumps, as they do from a batching
server: a batch answers several clients within a few milliseconds. The warm-up completes at the last
answer of such a lump and any answer could close the window, which would then be the first of its
lump, so the window would count one lump short of the time it spans — 12 of a cell's ~144 images
(−8 %) for 8 clients × 4 images answered 16 at a time. One client's answers are one cycle apart, so a
window from one of them to another spans whole cycles of every client, and counts each lump once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench.common import percentile_ms


@dataclass(frozen=True, kw_only=True)
class WindowConfig:
    duration_s: float
    min_requests: int = 3
    max_s: float = 120.0
    """Hard bound on the window (and separately on the warm-up) so a stalled server cannot hang a run."""


@dataclass(kw_only=True)
class Record:
    client: int
    start: float
    end: float
    images: int
    ok: bool


@dataclass(kw_only=True)
class Window:
    """Shared bookkeeping of one measurement (thread-safe appends; decisions under a lock)."""

    num_clients: int
    config: WindowConfig
    records: list[Record] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    t_open: float | None = None
    t_close: float | None = None
    opener: int | None = None
    """The client whose answer opened the window; one of its answers closes it."""
    _warm: set[int] = field(default_factory=set)
    _counts: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._counts = [0] * self.num_clients

    @property
    def closed(self) -> bool:
        if self.t_close is None and time.perf_counter() - self.started > 2 * self.config.max_s:
            self.t_close = time.perf_counter()  # warm-up never finished: give up, report what there is
        return self.t_close is not None

    def record(self, rec: Record) -> None:
        with self._lock:
            self.records.append(rec)
            if self.t_open is None:
                self._warm.add(rec.client)
                if len(self._warm) == self.num_clients:
                    self.t_open, self.opener = rec.end, rec.client
                return
            if self.t_close is not None:
                return
            if rec.start >= self.t_open:
                self._counts[rec.client] += 1
            age = rec.end - self.t_open
            enough = (
                age >= self.config.duration_s
                and min(self._counts) >= self.config.min_requests
                and rec.client == self.opener
            )
            if enough or age >= self.config.max_s:
                self.t_close = rec.end

    def summary(self) -> dict[str, Any]:
        if self.t_open is None or self.t_close is None or self.t_close <= self.t_open:
            return {"seconds": 0.0, "images": 0, "requests": 0, "errors": 0, "images_per_s": None}
        inside = [r for r in self.records if self.t_open < r.end <= self.t_close]
        latencies = [r.end - r.start for r in inside if r.ok and r.start >= self.t_open]
        seconds = self.t_close - self.t_open
        images = sum(r.images for r in inside if r.ok)
        return {
            "seconds": round(seconds, 3),
            "images": images,
            "requests": len(latencies),
            "errors": sum(1 for r in inside if not r.ok),
            "images_per_s": images / seconds,
            "p50_ms": percentile_ms(latencies, 50),
            "p99_ms": percentile_ms(latencies, 99),
            "latencies_s": latencies,
        }
