"""The fair batcher on its own: asyncio only, no gRPC."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.core.batcher import BatcherClosed, BatcherConfig, DeadlineExpired, FairBatcher, QueueFull
from services.core.packing import pack_groups


class Model:
    """run_batch that records (client, payload) per batch and can be held closed."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.seconds = seconds
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, payloads: list[str]) -> list[str]:
        self.gate.wait(10)
        if self.seconds:
            time.sleep(self.seconds)
        self.batches.append(list(payloads))
        return [p.upper() for p in payloads]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_merges_requests_of_several_clients_into_one_batch() -> None:
    async def main() -> None:
        model = Model()
        batcher = FairBatcher(model, BatcherConfig(max_batch_images=8, max_delay_ms=50))
        batcher.start()
        results = await asyncio.gather(
            batcher.submit("a", [("a1", 2)]),
            batcher.submit("b", [("b1", 3)]),
            batcher.submit("c", [("c1", 1)]),
        )
        assert results == [["A1"], ["B1"], ["C1"]]
        assert len(model.batches) == 1 and sorted(model.batches[0]) == ["a1", "b1", "c1"]
        await batcher.close()

    run(main())


def test_flushes_on_size_without_waiting_for_the_delay() -> None:
    async def main() -> None:
        model = Model()
        batcher = FairBatcher(model, BatcherConfig(max_batch_images=4, max_delay_ms=10_000))
        batcher.start()
        started = time.perf_counter()
        await batcher.submit("a", [("x", 2), ("y", 2)])
        assert time.perf_counter() - started < 5.0  # far below the 10 s delay
        await batcher.close()

    run(main())


def test_flushes_a_small_batch_after_max_delay() -> None:
    async def main() -> None:
        model = Model()
        batcher = FairBatcher(model, BatcherConfig(max_batch_images=64, max_delay_ms=200))
        batcher.start()
        started = time.perf_counter()
        assert await batcher.submit("a", [("x", 1)]) == ["X"]
        elapsed = time.perf_counter() - started
        assert 0.18 <= elapsed < 5.0
        await batcher.close()

    run(main())


def test_jobs_queued_behind_a_running_batch_wait_for_the_clients_it_answers() -> None:
    """Closed-loop clients that start in two cohorts merge into one batch, not alternating halves."""

    async def main() -> None:
        model = Model(seconds=0.2)
        batcher = FairBatcher(model, BatcherConfig(max_batch_images=32, max_delay_ms=50))
        batcher.start()

        async def client(name: str, start_s: float) -> None:
            await asyncio.sleep(start_s)
            for i in range(4):
                await batcher.submit(name, [(f"{name}{i}", 1)])
                await asyncio.sleep(0.01)  # the answer's way back and the next request's way in

        # a and b are in the model from 0.05 to 0.25 s; c and d arrive at 0.1 s, behind that batch.
        # Counted from arrival, their delay would be up at 0.15 s, so they would run alone the moment
        # the model is free, a and b behind them, and so on: eight batches of two.
        await asyncio.gather(client("a", 0), client("b", 0), client("c", 0.1), client("d", 0.1))
        assert [sorted(b) for b in model.batches] == [
            ["a0", "b0"],
            ["a1", "b1", "c0", "d0"],
            ["a2", "b2", "c1", "d1"],
            ["a3", "b3", "c2", "d2"],
            ["c3", "d3"],
        ]
        await batcher.close()

    run(main())


def test_equal_closed_loop_clients_keep_full_batches() -> None:
    """A started request finishes before later ones, so clients that come back one after another
    still fill every batch.

    Four clients keep one 16-image request (four jobs) in flight on a 32-image model, and each takes
    a different time to come back with its next request. Shared job by job, every request would be
    split over two batches, all four answered by the second, and the first one back would run alone
    after max_delay_ms, batch after batch.
    """

    async def main() -> None:
        model = Model(seconds=0.2)
        batcher = FairBatcher(model, BatcherConfig(max_batch_images=32, max_delay_ms=10))
        batcher.start()

        async def client(k: int) -> None:
            for i in range(4):
                await batcher.submit(f"c{k}", [(f"c{k}r{i}j{j}", 4) for j in range(4)])
                await asyncio.sleep(0.03 * k)  # the way back: 0 to 90 ms, each its own

        await asyncio.gather(*(client(k) for k in range(4)))
        sizes = [4 * len(batch) for batch in model.batches]
        assert sizes == [32] * 8, model.batches
        for batch in model.batches:  # two whole requests a batch
            assert len({p.split("j")[0] for p in batch}) == 2, model.batches
        await batcher.close()

    run(main())


def test_a_started_request_does_not_go_ahead_of_a_smaller_one() -> None:
    """Finishing a started request first never delays a smaller request: that one goes by fair order."""

    async def main() -> None:
        model = Model(seconds=0.2)
        config = BatcherConfig(max_batch_images=8, max_delay_ms=0, contention_latency_slack=None)
        batcher = FairBatcher(model, config)
        batcher.start()
        big = asyncio.create_task(batcher.submit("big", [(f"b{i}", 4) for i in range(4)]))
        await asyncio.sleep(0.05)  # b0 and b1 are in the model; b2 and b3 wait
        await batcher.submit("small", [("s0", 4)])
        await big
        # Behind the first batch, the small request (4 images) runs next to one more job of the big one,
        # not after the big one's 8 remaining images.
        assert [sorted(b) for b in model.batches] == [["b0", "b1"], ["b2", "s0"], ["b3"]]
        await batcher.close()

    run(main())


def test_a_client_back_right_after_its_answer_does_not_win_every_tie() -> None:
    """A closed-loop client cannot starve a heavy client whose backlog is smaller than a batch.

    The heavy client's 28 images are less than a batch, so each batch waits max_delay_ms for more work,
    and the light client's next request arrives meanwhile. Were it to restart level with the heavy
    client each time, it would win every tie (light first) and take every batch while it kept sending.
    """

    async def main() -> None:
        model = Model(seconds=0.04)
        config = BatcherConfig(max_batch_images=32, max_delay_ms=30, active_window_ms=1000)
        batcher = FairBatcher(model, config)
        batcher.start()
        await batcher.submit("light", [("warm", 4)])  # one batch of 4 for the cost model

        # Two requests in flight make "heavy" heavy; while both clients are active its batches are
        # kept to the light client's own size (4 images), so the two take turns, one job a batch.
        heavy_jobs = [[(f"H{r}{i}", 4) for i in range(3)] + [(f"H{r}3", 2)] for r in range(2)]
        heavy = asyncio.gather(*(batcher.submit("heavy", jobs) for jobs in heavy_jobs))
        await asyncio.sleep(0)
        for i in range(6):
            await batcher.submit("light", [(f"l{i}", 4)])
        await heavy
        # Up to the last batch holding heavy work, no two batches in a row are the light client's alone.
        holds_heavy = [any(p.startswith("H") for p in batch) for batch in model.batches[1:]]
        last_heavy = max(i for i, h in enumerate(holds_heavy) if h)
        pattern = "".join("H" if h else "l" for h in holds_heavy[: last_heavy + 1])
        assert "ll" not in pattern, model.batches
        await batcher.close()

    run(main())


def test_round_robin_in_images_between_a_flooder_and_a_small_client() -> None:
    """While both are backlogged, each batch is shared equally in images."""

    async def main() -> None:
        model = Model()
        model.gate.clear()  # hold the model so both queues fill before the first batch
        batcher = FairBatcher(model, BatcherConfig(max_batch_images=8, max_delay_ms=0))
        batcher.start()
        flood = asyncio.gather(*(batcher.submit("flood", [(f"F{i}", 4)]) for i in range(10)))
        await asyncio.sleep(0.05)  # the first flood job is now in the (held) model
        small = asyncio.gather(*(batcher.submit("small", [(f"s{i}", 1)]) for i in range(8)))
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(flood, small)
        # After the first batch (flood only), each batch holds 4 flood images and 4 small ones
        # until the small client's 8 images are done: it is never starved behind 36 flood images.
        small_batches = [b for b in model.batches if any(p.startswith("s") for p in b)]
        assert len(small_batches) == 2, model.batches
        for batch in small_batches:
            assert sum(4 for p in batch if p.startswith("F")) == 4
            assert sum(1 for p in batch if p.startswith("s")) == 4
        last_small = max(i for i, b in enumerate(model.batches) if b in small_batches)
        assert last_small <= 2
        await batcher.close()

    run(main())


def test_idle_client_cannot_bank_credit() -> None:
    """A client served long ago starts level with the waiting clients, not far behind them."""

    async def main() -> None:
        model = Model()
        batcher = FairBatcher(model, BatcherConfig(max_batch_images=2, max_delay_ms=0))
        batcher.start()
        await batcher.submit("a", [("a0", 1)])
        model.gate.clear()
        busy = asyncio.gather(*(batcher.submit("b", [(f"b{i}", 1)]) for i in range(6)))
        await asyncio.sleep(0.05)
        late = asyncio.gather(*(batcher.submit("a", [(f"a{i}", 1)]) for i in range(1, 5)))
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(busy, late)
        # After a's arrival, batches alternate one a / one b rather than draining a first.
        after = [b for b in model.batches[1:] if any(p.startswith("a") for p in b)]
        assert all(sum(p.startswith("b") for p in b) >= 1 for b in after[:-1]), model.batches
        await batcher.close()

    run(main())


def test_cancelled_job_never_reaches_the_model() -> None:
    async def main() -> None:
        model = Model()
        model.gate.clear()
        batcher = FairBatcher(model, BatcherConfig(max_batch_images=1, max_delay_ms=0))
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("a", [("first", 1)]))
        await asyncio.sleep(0.05)  # "first" is in the model, held
        doomed = asyncio.ensure_future(batcher.submit("a", [("doomed", 1)]))
        await asyncio.sleep(0.01)
        assert batcher.queued_images() == 1
        doomed.cancel()
        await asyncio.sleep(0.01)
        assert batcher.queued_images() == 0
        model.gate.set()
        assert await first == ["FIRST"]
        assert await batcher.submit("a", [("after", 1)]) == ["AFTER"]
        assert all("doomed" not in b for b in model.batches)
        await batcher.close()

    run(main())


def test_expired_job_is_dropped_before_the_model() -> None:
    async def main() -> None:
        model = Model()
        model.gate.clear()
        batcher = FairBatcher(model, BatcherConfig(max_batch_images=1, max_delay_ms=0))
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("a", [("first", 1)]))
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(batcher.submit("b", [("late", 1)], timeout_s=0.05))
        await asyncio.sleep(0.2)
        model.gate.set()
        await first
        with pytest.raises(DeadlineExpired):
            await late
        assert all("late" not in b for b in model.batches)
        await batcher.close()

    run(main())


def test_queue_bounds_refuse_with_retry_hint_and_spare_other_clients() -> None:
    async def main() -> None:
        model = Model()
        model.gate.clear()
        cfg = BatcherConfig(
            max_batch_images=2, max_delay_ms=0, max_queued_images_per_client=4, max_queued_images=6
        )
        batcher = FairBatcher(model, cfg)
        batcher.start()
        held = asyncio.ensure_future(batcher.submit("a", [("a0", 2)]))
        await asyncio.sleep(0.05)  # in the model
        queued = asyncio.ensure_future(batcher.submit("a", [("a1", 2), ("a2", 2)]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as info:
            await batcher.submit("a", [("a3", 1)])
        assert info.value.retry_after_s > 0
        other = asyncio.ensure_future(batcher.submit("b", [("b0", 2)]))  # b still has room
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="server queue full"):
            await batcher.submit("c", [("c0", 1)])  # 6 images waiting in total
        with pytest.raises(ValueError, match="can never fit"):
            await batcher.submit("d", [("d0", 5)])
        model.gate.set()
        await asyncio.gather(held, queued, other)
        await batcher.close()

    run(main())


def test_a_request_refused_for_a_full_server_queue_keeps_its_place_for_the_retry() -> None:
    async def main() -> None:
        model = Model()
        model.gate.clear()
        cfg = BatcherConfig(
            max_batch_images=2, max_delay_ms=0, max_queued_images_per_client=4, max_queued_images=4
        )
        batcher = FairBatcher(model, cfg)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("a", [("a0", 2)]))
        await asyncio.sleep(0.05)  # in the model, no longer queued
        waiting = asyncio.ensure_future(batcher.submit("a", [("a1", 2), ("a2", 2)]))  # fills the queue
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="server queue full") as refused:
            batcher.check_admission("late", 2)
        assert refused.value.retry_after_s > 0
        model.gate.set()
        await asyncio.gather(running, waiting)
        # Room for 4 again. "late" holds 2 of them: a newcomer asking for 3 must wait behind it ...
        with pytest.raises(QueueFull, match="2 held for earlier refused requests"):
            batcher.check_admission("newcomer", 3)
        # ... one asking for 2 fits beside it, and "late" itself is admitted into its place.
        batcher.check_admission("newcomer", 2)
        assert await batcher.submit("late", [("l0", 2)]) == ["L0"]
        # Its place is used up: the newcomer's 3 images fit now.
        assert await batcher.submit("newcomer", [("n0", 3)]) == ["N0"]
        await batcher.close()

    run(main())


@pytest.mark.parametrize("tickets", [True, False])
def test_each_call_of_a_client_keeps_its_own_place_when_it_names_its_ticket(tickets: bool) -> None:
    async def main() -> None:
        model = Model()
        model.gate.clear()
        cfg = BatcherConfig(
            max_batch_images=2, max_delay_ms=0, max_queued_images_per_client=4, max_queued_images=4
        )
        batcher = FairBatcher(model, cfg)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("a", [("a0", 2)]))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(batcher.submit("a", [("a1", 2), ("a2", 2)]))  # fills the queue
        await asyncio.sleep(0.01)
        first = "" if tickets else None  # a ticket-aware client's first try, or one sending none
        names = []
        for _ in range(2):  # two calls of one client in flight, both refused
            with pytest.raises(QueueFull) as refused:
                batcher.check_admission("late", 2, first)
            names.append(refused.value.ticket)
        model.gate.set()
        await asyncio.gather(running, waiting)
        model.gate.clear()
        admitted = asyncio.ensure_future(batcher.submit("late", [("l0", 2)], ticket=names[0]))
        await asyncio.sleep(0.05)  # in the model: the queue is empty again
        if tickets:  # the second call's place survives its sibling's admission
            assert names[0] != names[1] and all(names)
            with pytest.raises(QueueFull, match="2 held"):
                batcher.check_admission("newcomer", 3)
        else:  # one shared place, used up by whichever call came first: the newcomer takes the room
            assert names == [None, None]
            batcher.check_admission("newcomer", 3)
        model.gate.set()
        assert await admitted == ["L0"]
        assert await batcher.submit("late", [("l1", 2)], ticket=names[1]) == ["L1"]
        await batcher.close()

    run(main())


def test_a_call_in_line_keeps_its_place_while_its_own_client_queue_is_full() -> None:
    async def main() -> None:
        model = Model()
        model.gate.clear()
        cfg = BatcherConfig(
            max_batch_images=2, max_delay_ms=0, max_queued_images_per_client=2, max_queued_images=4
        )
        batcher = FairBatcher(model, cfg)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("x", [("x0", 2)]))
        await asyncio.sleep(0.05)  # in the model
        others = [asyncio.ensure_future(batcher.submit(c, [(f"{c}0", 2)])) for c in ("y", "z")]
        await asyncio.sleep(0.01)  # the server queue is full
        with pytest.raises(QueueFull, match="server queue full") as refused:
            batcher.check_admission("late", 2, "")
        ticket = refused.value.ticket
        for task in others:  # room again, beside the 2 images held for "late"
            task.cancel()
        await asyncio.sleep(0.01)
        sibling = asyncio.ensure_future(batcher.submit("late", [("l0", 2)], ticket=""))
        await asyncio.sleep(0.01)  # queued: "late"'s own queue is full now
        with pytest.raises(QueueFull, match="client queue full") as again:
            batcher.check_admission("late", 2, ticket)
        assert ticket and again.value.ticket == ticket  # its place is named again, not lost
        with pytest.raises(QueueFull, match="2 held"):
            batcher.check_admission("newcomer", 2)
        model.gate.set()
        assert await sibling == ["L0"]
        assert await batcher.submit("late", [("l1", 2)], ticket=ticket) == ["L1"]
        await running
        await batcher.close()

    run(main())


@pytest.mark.parametrize("max_waiting_images", [16384, 4])
def test_the_line_holds_every_refused_call_up_to_its_own_bound(max_waiting_images: int) -> None:
    async def main() -> None:
        model = Model()
        model.gate.clear()
        cfg = BatcherConfig(
            max_batch_images=2,
            max_delay_ms=0,
            max_queued_images_per_client=4,
            max_queued_images=4,
            max_waiting_images=max_waiting_images,
        )
        batcher = FairBatcher(model, cfg)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("x", [("x0", 2)]))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit("y", [("y0", 2), ("y1", 2)]))
        await asyncio.sleep(0.01)
        tickets = []
        for client in ("a", "b", "c"):  # 6 images refused at once, more than one server queue
            with pytest.raises(QueueFull, match="server queue full") as refused:
                batcher.check_admission(client, 2, "")
            tickets.append(refused.value.ticket)
        if max_waiting_images >= 6:
            assert all(tickets)
            with pytest.raises(QueueFull, match="6 held"):
                batcher.check_admission("newcomer", 1, "")
        else:  # the line is full after two places: the third call has none to name
            assert all(tickets[:2]) and tickets[2] is None
        model.gate.set()
        await asyncio.gather(running, queued)
        await batcher.close()

    run(main())


def test_a_place_in_line_lapses_when_its_client_does_not_retry() -> None:
    async def main() -> None:
        model = Model()
        model.gate.clear()
        cfg = BatcherConfig(
            max_batch_images=2,
            max_delay_ms=0,
            max_queued_images_per_client=2,
            max_queued_images=2,
            retry_grace_ms=50,
        )
        batcher = FairBatcher(model, cfg)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("a", [("a0", 2)]))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(batcher.submit("a", [("a1", 2)]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as refused:
            batcher.check_admission("gone", 2)
        model.gate.set()
        await asyncio.gather(running, waiting)
        with pytest.raises(QueueFull, match="2 held"):  # "gone" may still come back
            batcher.check_admission("other", 2)
        await asyncio.sleep(refused.value.retry_after_s + 0.1)  # past its hint and the 50 ms grace
        assert await batcher.submit("other", [("o0", 2)]) == ["O0"]
        await batcher.close()

    run(main())


def test_all_or_nothing_admission_and_oversized_job_runs_alone() -> None:
    async def main() -> None:
        model = Model()
        batcher = FairBatcher(model, BatcherConfig(max_batch_images=2, max_delay_ms=0))
        batcher.start()
        assert await batcher.submit("a", [("big", 5)]) == ["BIG"]
        assert model.batches == [["big"]]
        await batcher.close()

    run(main())


def test_close_finishes_queued_work_then_refuses() -> None:
    async def main() -> None:
        model = Model(seconds=0.01)
        batcher = FairBatcher(model, BatcherConfig(max_batch_images=1, max_delay_ms=0))
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit("a", [(f"x{i}", 1)])) for i in range(5)]
        await asyncio.sleep(0)
        await batcher.close()
        assert [await p for p in pending] == [[f"X{i}"] for i in range(5)]
        with pytest.raises(BatcherClosed):
            await batcher.submit("a", [("y", 1)])

    run(main())


def test_model_failure_fails_that_batch_only() -> None:
    async def main() -> None:
        calls = []

        def flaky(payloads: list[str]) -> list[str]:
            calls.append(payloads)
            if "boom" in payloads:
                raise RuntimeError("model exploded")
            return payloads

        batcher = FairBatcher(flaky, BatcherConfig(max_batch_images=1, max_delay_ms=0))
        batcher.start()
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.submit("a", [("boom", 1)])
        assert await batcher.submit("a", [("fine", 1)]) == ["fine"]
        await batcher.close()

    run(main())


@pytest.mark.parametrize(
    ("group_ids", "max_count", "expected"),
    [
        (["", "", "", ""], 3, [[0, 1, 2], [3]]),
        (["g", "h", "g", "h"], 2, [[0, 2], [1, 3]]),
        (["g", "g", "g", "", ""], 2, [[0, 1, 2], [3, 4]]),  # an oversized group is not split
        (["a", "", "a", "b"], 3, [[0, 2, 1], [3]]),
    ],
)
def test_pack_groups_keeps_groups_whole(
    group_ids: list[str], max_count: int, expected: list[list[int]]
) -> None:
    assert pack_groups(group_ids, max_count=max_count) == expected


def test_pack_groups_respects_weight() -> None:
    parts = pack_groups(["", "", "", ""], max_count=10, weights=[5, 5, 5, 5], max_weight=10)
    assert parts == [[0, 1], [2, 3]]
