"""Which clients contend and how short their shared batches are kept: the tracker alone (a hand-driven
clock), then through the batcher with a model whose cost grows with the batch."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.core.batch_cost import LinearCost
from services.core.batcher import BatcherConfig, FairBatcher
from services.core.contention import ContentionTracker

PROPORTIONAL = LinearCost(fixed_s=0.0, per_image_s=0.01)
MOSTLY_FIXED = LinearCost(fixed_s=0.1, per_image_s=0.001)


def _flood_and_small(now: float = 0.0) -> ContentionTracker:
    tracker = ContentionTracker(slack=0.1, window_s=0.1, max_batch_images=32)
    tracker.request_started("flood", 32, 32, now)
    tracker.request_started("flood", 32, 64, now)  # two requests waiting: a flood
    tracker.request_started("small", 4, 4, now)
    return tracker


def test_a_flood_next_to_a_light_client_gets_short_batches() -> None:
    tracker = _flood_and_small()
    queued = {"flood": 64, "small": 4}
    limit = tracker.limit(queued, lambda: PROPORTIONAL, 0.0)
    # Largest n with 0.01·n <= 1.1 × 0.01·4 s.
    assert limit.heavy == {"flood"} and limit.heavy_batch_images == 4
    # Where a batch costs mostly its fixed part, n <= (1.1 × 0.104 − 0.1) / 0.001 = 14.
    assert tracker.limit(queued, lambda: MOSTLY_FIXED, 0.0).heavy_batch_images == 14
    assert tracker.limit(queued, lambda: None, 0.0).heavy == frozenset()  # no batch measured yet


def test_light_client_is_protected_between_requests_then_forgotten() -> None:
    tracker = _flood_and_small()
    tracker.request_finished("small", 1.0)
    queued = {"flood": 64}
    tracker.request_started("flood", 32, 64, 1.0)  # the flood goes on
    assert tracker.limit(queued, lambda: PROPORTIONAL, 1.05).heavy == {"flood"}  # small is thinking
    assert tracker.limit(queued, lambda: PROPORTIONAL, 1.2).heavy == frozenset()  # small left: full batches


def test_by_default_a_client_pausing_between_requests_stays_light() -> None:
    """The default window covers a client that prepares its next request for a few hundred ms (an
    evaluation loop), not only one that sends it the moment it has its answer."""
    tracker = ContentionTracker(
        slack=0.1, window_s=BatcherConfig().active_window_ms / 1000.0, max_batch_images=32
    )
    tracker.request_started("flood", 32, 32, 0.0)
    tracker.request_started("flood", 32, 64, 0.0)
    tracker.request_started("small", 4, 4, 0.0)
    tracker.request_finished("small", 1.0)
    # 0.3 s into its pause: the flood's batches are still kept short for it.
    assert tracker.limit({"flood": 64}, lambda: PROPORTIONAL, 1.3).heavy == {"flood"}


def test_a_flood_down_to_one_request_stays_heavy_until_it_drains() -> None:
    tracker = _flood_and_small()
    tracker.request_finished("small", 0.4)
    tracker.request_started("small", 4, 4, 0.45)
    two_waiting = {"flood": 64, "small": 4}
    assert tracker.limit(two_waiting, lambda: PROPORTIONAL, 0.45).heavy == {"flood"}
    tracker.request_finished("flood", 0.5)  # one request left, the next one not sent
    # Its last request's remaining 22 images are still a flood's backlog, however long they take.
    for now in (0.54, 0.6, 0.68, 0.76):
        assert tracker.limit({"flood": 22, "small": 4}, lambda: PROPORTIONAL, now).heavy == {"flood"}
    # Drained by 0.8: heavy for the window after, then a one-request client like any other.
    assert tracker.limit({"small": 4}, lambda: PROPORTIONAL, 0.8).heavy == {"flood"}
    tracker.request_finished("flood", 0.84)
    assert tracker.limit({"small": 4}, lambda: PROPORTIONAL, 0.92).heavy == frozenset()
    tracker.request_started("flood", 32, 32, 0.95)
    assert tracker.limit({"flood": 32, "small": 4}, lambda: PROPORTIONAL, 0.95).heavy == frozenset()


def test_no_limit_among_equals_and_one_huge_request_is_heavy() -> None:
    tracker = ContentionTracker(slack=0.1, window_s=0.1, max_batch_images=32)
    for client in range(16):
        tracker.request_started(f"c{client}", 1, 1, 0.0)
    asked: list[None] = []

    def cost() -> LinearCost:
        asked.append(None)
        return PROPORTIONAL

    assert tracker.limit({f"c{c}": 1 for c in range(16)}, cost, 0.0).heavy == frozenset()
    assert not asked  # the cost model is consulted only while clients contend
    tracker.request_started("trainer", 128, 128, 0.0)  # more than a full batch in one request
    limit = tracker.limit({"trainer": 128, **{f"c{c}": 1 for c in range(16)}}, lambda: PROPORTIONAL, 0.0)
    assert limit.heavy == {"trainer"} and limit.heavy_batch_images == 1


class CostlyModel:
    """Sleeps 1 ms per image, as a CPU-bound model costs; records each batch's payloads."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def __call__(self, payloads: list[tuple[str, int]]) -> list[str]:
        time.sleep(0.001 * sum(size for _, size in payloads))
        self.batches.append([name for name, _ in payloads])
        return [name for name, _ in payloads]


async def _flood_with_small_client(config: BatcherConfig) -> tuple[CostlyModel, list[int]]:
    """Two 32-image flood requests always waiting; a small client sends ten 4-image requests in turn.
    Returns the model and the size of each batch that held the small client's work."""
    model = CostlyModel()
    batcher = FairBatcher(model, config)
    batcher.start()
    stop = asyncio.Event()

    async def flood() -> None:
        while not stop.is_set():
            await batcher.submit("flood", [(("F", 4), 4)] * 8)

    floods = [asyncio.create_task(flood()) for _ in range(2)]
    await asyncio.sleep(0.2)  # the flood runs alone for a while
    for index in range(10):
        await batcher.submit("small", [((f"s{index}", 4), 4)])
    stop.set()
    await asyncio.gather(*floods)
    await batcher.close()
    sizes = {id(b): 4 * len(b) for b in model.batches}
    return model, [sizes[id(b)] for b in model.batches if any(n.startswith("s") for n in b)]


def test_batcher_keeps_the_small_clients_batches_short_under_a_flood() -> None:
    model, small_batches = asyncio.run(_flood_with_small_client(BatcherConfig(max_delay_ms=1)))
    assert small_batches == [4] * 10  # alone in its batch: flood work would have lengthened it
    first_small = next(i for i, b in enumerate(model.batches) if b[0].startswith("s"))
    assert len(model.batches[first_small - 1]) == 8  # before it arrived the flood filled batches of 32
    last_small = max(i for i, b in enumerate(model.batches) if b[0].startswith("s"))
    assert all(len(b) == 1 for b in model.batches[first_small:last_small])  # then ran 4 at a time


def test_without_the_limit_the_small_client_shares_full_batches() -> None:
    config = BatcherConfig(max_delay_ms=1, contention_latency_slack=None)
    _, small_batches = asyncio.run(_flood_with_small_client(config))
    assert min(small_batches) > 4 and max(small_batches) == 32  # always behind and beside flood work


def test_config_refuses_a_negative_slack() -> None:
    with pytest.raises(ValueError, match="contention_latency_slack"):
        BatcherConfig(contention_latency_slack=-0.1)
    with pytest.raises(ValueError, match="max_job_images"):
        BatcherConfig(max_job_images=0)
