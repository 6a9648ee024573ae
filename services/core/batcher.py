"""Fair dynamic batcher: merges work from many clients into model batches.

Knows nothing about gRPC. Each client (a team's token, or a connection) has its own FIFO queue. A batch
is flushed when ``max_batch_images`` are waiting or the oldest waiting job has waited ``max_delay_ms`` for
the model (time behind a running batch does not count), and it is filled by always taking the next job
from the backlogged client that has been served the fewest images so far (start-time fair queueing,
measured in images). A trainer sending 256-image requests therefore cannot starve an evaluation job
sending 4 images at a time: both get an equal share of each batch while both are backlogged.

The counts are tags on one virtual clock: the count at which the last job taken started. A client that
becomes backlogged starts at that clock or at its own count, whichever is larger. Idle time therefore
cannot be banked into a later burst, and a client that was just served cannot come back level with a
waiting one and win every tie: a one-request-at-a-time client would otherwise take every batch formed
after its next request arrives, and starve a client whose backlog is smaller than a batch. A request
the model has started keeps the tag it started at while that delays no one by more than a batch and
no smaller request (``_order_tag``), so equal clients' requests are not split over batches for nothing.

Fair order alone cannot stop a flood from delaying a small client, because a batch is never preempted;
while clients contend, batches holding a flood's work are kept short (:mod:`services.core.contention`),
sized by a cost model learnt from the batches run (:mod:`services.core.batch_cost`).

Queues are bounded per client and in total; a request refused because the whole queue was full keeps
a place in line for its retry (:mod:`services.core.waitlist`), so the room that frees goes to it and not
to whoever asks next. A job whose caller went away (cancelled) or whose deadline passed is dropped
before it reaches the model. The model runs in a worker thread so the event loop keeps
decoding and queueing the next requests meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from services.core.batch_cost import BatchCostModel
from services.core.contention import ContentionTracker
from services.core.waitlist import Waitlist

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class BatcherConfig:
    """Batching and admission limits of one served model."""

    max_batch_images: int = 32
    """Flush as soon as this many images wait; a batch never exceeds it unless one job alone does."""
    max_delay_ms: float = 5.0
    """Flush when the oldest waiting job has waited this long since the model was free to take it
    (arrival, or the end of the batch it queued behind), even if the batch is small."""
    max_queued_images_per_client: int = 1024
    """Per-client bound; past it the client is told RESOURCE_EXHAUSTED (other clients are unaffected)."""
    max_queued_images: int = 4096
    """Bound over all clients together (memory of decoded images waiting)."""
    max_job_images: int = 4
    """Requests are cut into jobs of at most this many images (groups stay whole): the unit in which
    batches interleave clients, and in which a batch can be kept small while clients contend."""
    contention_latency_slack: float | None = 0.1
    """While a flood and a one-request-at-a-time client are both active, a batch holding the flood's
    work may run at most (1 + slack) × the predicted time of that client's request alone, so the request
    waits about two such batches, not two full ones. The flood gives up what short batches lose against
    full ones on this device (little where cost grows with batch size); ``docs/benchmarks.md`` §3
    measures it. None: always fill batches."""
    active_window_ms: float = 1000.0
    """A client counts as active while it has a request in flight and this long after its last answer,
    so a client between two requests stays protected: one that prepares its next request for up to
    about this long (an evaluation loop, a person), not only one that sends it the moment it has its
    answer. Set it above the think time of the clients to protect; a flood keeps short batches for
    this long after such a client's last answer. Measured in ``docs/benchmarks.md`` §3: with 100 ms, a
    client pausing 0.3 s between requests saw 6.3x its solo p99 under a flood, 1.7x with 1 s."""
    retry_grace_ms: float = 1000.0
    """A request refused for a full server queue keeps its place in line this long past its retry
    hint; a client that has not retried by then loses it (and the room it held is freed)."""
    max_waiting_images: int = 16384
    """Bound on the images the places in line hold together. It must exceed what every call refused
    at once asks for, or the calls past it get no place and retry at random (16 clients × 3 calls
    against a 48-image queue with a line of 48: one request needed 33 tries). Each place lapses
    within its hint plus ``retry_grace_ms``, so client names made up without a token delay others by
    at most that long."""

    @property
    def job_images(self) -> int:
        """Images per job a request is cut into: ``max_job_images``, within one batch."""
        return min(self.max_job_images, self.max_batch_images)

    def __post_init__(self) -> None:
        if self.max_batch_images < 1:
            raise ValueError(f"max_batch_images must be >= 1, got {self.max_batch_images}")
        if self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.max_job_images < 1:
            raise ValueError(f"max_job_images must be >= 1, got {self.max_job_images}")
        if self.contention_latency_slack is not None and not self.contention_latency_slack >= 0:
            raise ValueError(
                f"contention_latency_slack must be >= 0 or None, got {self.contention_latency_slack}"
            )
        if self.active_window_ms < 0:
            raise ValueError(f"active_window_ms must be >= 0, got {self.active_window_ms}")
        if self.retry_grace_ms < 0:
            raise ValueError(f"retry_grace_ms must be >= 0, got {self.retry_grace_ms}")
        if self.max_waiting_images < 0:
            raise ValueError(f"max_waiting_images must be >= 0, got {self.max_waiting_images}")
        if not 1 <= self.max_queued_images_per_client <= self.max_queued_images:
            raise ValueError(
                "need 1 <= max_queued_images_per_client <= max_queued_images, got "
                f"{self.max_queued_images_per_client} and {self.max_queued_images}"
            )


class QueueFull(Exception):
    """The client's (or the server's) queue cannot take this work now; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float, ticket: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.ticket = ticket
        """The place in line this refusal holds, for the caller to name on its retry (None: the
        client's shared place, or none)."""


class DeadlineExpired(Exception):
    """The job's deadline passed while it waited; it was never run."""


class BatcherClosed(Exception):
    """The batcher is draining or stopped and accepts no new work."""


class BatcherObserver(Protocol):
    """Hooks for metrics; called on the event loop."""

    def batch_done(self, num_images: int, num_jobs: int, seconds: float) -> None: ...

    def queue_depth(self, client: str, num_images: int) -> None: ...

    def dropped(self, reason: str, num_images: int) -> None: ...


@dataclass(eq=False)
class _Job(Generic[T, R]):
    client: str
    payload: T
    size: int
    deadline: float | None
    enqueued: float
    request: int  # which submit() it came from: its request's jobs share the number
    future: asyncio.Future[R] = field(repr=False)


class FairBatcher(Generic[T, R]):
    """Per-client queues drained fairly (in images) into batches run by ``run_batch`` in a thread.

    ``run_batch(payloads) -> results`` receives the payloads of one batch and returns one result per
    payload, in order; if it raises, every job of that batch fails with that exception.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        config: BatcherConfig | None = None,
        *,
        executor: Executor | None = None,
        observer: BatcherObserver | None = None,
    ) -> None:
        self.config = config or BatcherConfig()
        self._run_batch = run_batch
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._observer = observer
        self._queues: dict[str, collections.deque[_Job[T, R]]] = {}
        self._served: dict[str, int] = {}  # each client's tag on the virtual clock, in images served
        self._virtual = 0  # the count at which the last job taken started
        self._request_tag: dict[str, tuple[int, int]] = {}  # client -> (request, its tag when started)
        self._request_ids = itertools.count()
        self._queued_images: dict[str, int] = {}
        self._total_queued = 0
        self._arrival = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._images_per_s: float | None = None  # smoothed service throughput, for retry hints
        self._model_free_since = float("-inf")  # loop time the last batch ended
        self._backlog_at_free = False  # whether work was waiting when it ended
        self._cost = BatchCostModel()
        self._tickets = itertools.count(1)
        self._waitlist = Waitlist(
            grace_s=self.config.retry_grace_ms / 1000.0, capacity=self.config.max_waiting_images
        )
        slack = self.config.contention_latency_slack
        self._contention = (
            None
            if slack is None
            else ContentionTracker(
                slack=slack,
                window_s=self.config.active_window_ms / 1000.0,
                max_batch_images=self.config.max_batch_images,
            )
        )

    # -- public API --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="fair-batcher")

    async def submit(
        self,
        client: str,
        jobs: Sequence[tuple[T, int]],
        *,
        timeout_s: float | None = None,
        ticket: str | None = None,
    ) -> list[R]:
        """Queue ``jobs`` (payload, number of images) for ``client`` atomically; return their results.

        Either all jobs are admitted or none is (QueueFull), so a request is never half-queued.
        Cancelling the awaiting task removes the client's still-queued jobs. ``ticket`` names the
        request's place in line (:meth:`check_admission`).
        """
        if self._closing or self._task is None:
            raise BatcherClosed("the server is draining and accepts no new work")
        if not jobs:
            return []
        total = sum(size for _, size in jobs)
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._admit(client, total, now, ticket)
        place = _place(client, ticket)
        if place is not None:
            self._waitlist.release(place)
        deadline = None if timeout_s is None else now + timeout_s
        queue = self._queues.get(client)
        if not queue:
            queue = self._queues[client] = collections.deque()
            self._served[client] = max(self._served.get(client, 0), self._virtual)
        request = next(self._request_ids)
        queued = [
            _Job(client, payload, size, deadline, now, request, loop.create_future())
            for payload, size in jobs
        ]
        queue.extend(queued)
        self._queued_images[client] = self._queued_images.get(client, 0) + total
        self._total_queued += total
        if self._contention is not None:
            self._contention.request_started(client, total, self._queued_images[client], now)
        self._report_depth(client)
        self._arrival.set()
        try:
            return list(await asyncio.gather(*(job.future for job in queued)))
        except BaseException:
            # The caller is gone or one job failed: pull whatever of ours is still waiting.
            for job in queued:
                if self._remove(job) or not job.future.done():
                    job.future.cancel()
            raise
        finally:
            if self._contention is not None:
                self._contention.request_finished(client, loop.time())

    def check_admission(self, client: str, num_images: int, ticket: str | None = None) -> None:
        """Raise QueueFull (or ValueError if it can never fit) without queueing anything.

        A refusal for a full server queue takes a place in line, as in :meth:`submit`. ``ticket``
        says whose: ``None``, the client's one shared place (every call of the client uses it, and
        the first admitted uses it up); ``""``, a new place for this call, named by the refusal's
        ticket; a ticket, the place that refusal took, so a client with several calls in flight
        keeps one place per call instead of its calls taking each other's.
        """
        self._admit(client, num_images, asyncio.get_running_loop().time(), ticket)

    def estimated_wait_s(self) -> float:
        """Time the model needs for everything queued now, at its measured speed (a retry hint)."""
        return self._retry_after(self._total_queued)

    def queued_images(self, client: str | None = None) -> int:
        return self._total_queued if client is None else self._queued_images.get(client, 0)

    async def close(self) -> None:
        """Stop accepting work, finish everything already queued, then stop the worker."""
        self._closing = True
        self._arrival.set()
        if self._task is not None:
            await self._task
        if self._own_executor:
            self._executor.shutdown(wait=True)

    # -- admission ---------------------------------------------------------------------------------

    def _admit(self, client: str, num_images: int, now: float, ticket: str | None = None) -> None:
        cfg = self.config
        if num_images > cfg.max_queued_images_per_client:
            raise ValueError(
                f"request of {num_images} images can never fit the per-client queue of "
                f"{cfg.max_queued_images_per_client}; split it"
            )
        place = _place(client, ticket)
        mine = self._queued_images.get(client, 0)
        if mine + num_images > cfg.max_queued_images_per_client:
            # Its queue drains at its fair share: one backlogged client's worth of the throughput.
            backlogged = sum(1 for queue in self._queues.values() if queue)
            over = mine + num_images - cfg.max_queued_images_per_client
            retry_after_s = self._retry_after(over * backlogged)
            # A call waiting in line keeps its place while its own client's queue drains.
            kept = bool(ticket) and self._waitlist.keep(place, retry_after_s, now)  # a named place only
            raise QueueFull(
                f"client queue full: {mine} images waiting + {num_images} requested > "
                f"{cfg.max_queued_images_per_client}",
                retry_after_s,
                ticket if kept else None,
            )
        held = self._waitlist.ahead_of(place, now)
        excess = self._total_queued + held + num_images - cfg.max_queued_images
        if excess > 0:
            retry_after_s = self._retry_after(excess)  # until the model has made room for this one
            if place is None:  # a call's first refusal: a new place, named by a fresh ticket
                ticket = str(next(self._tickets))
                place = _place(client, ticket)
            held_place = self._waitlist.hold(place, num_images, retry_after_s, now)
            raise QueueFull(
                f"server queue full: {self._total_queued} images waiting + {held} held for earlier "
                f"refused requests + {num_images} requested > {cfg.max_queued_images}",
                retry_after_s,
                ticket if held_place else None,  # no room in line: nothing to name
            )

    def _retry_after(self, images_ahead: int) -> float:
        """Time for the model to work through ``images_ahead`` images at its measured speed."""
        if not self._images_per_s:
            return 0.1
        return min(max(images_ahead / self._images_per_s, 0.01), 30.0)

    # -- dispatch loop -----------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._total_queued == 0:
                if self._closing:
                    return
                self._arrival.clear()
                await self._arrival.wait()
                continue
            await self._wait_for_flush(loop)
            batch = self._take_batch(loop.time())
            if batch:
                await self._execute(loop, batch)

    async def _wait_for_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Return once a full batch waits, the oldest job has waited max_delay_ms for the model, or we
        are draining.

        A job's delay counts from when the model could first have taken it, not from its arrival. Jobs
        that queued behind a running batch would otherwise flush the moment it ends, before the clients
        it just answered send their next requests, and closed-loop clients would settle into two
        cohorts running half batches (twice the batches for the same work, which a GPU pays for).
        """
        delay = self.config.max_delay_ms / 1000.0
        while self._total_queued < self.config.max_batch_images and not self._closing:
            oldest = min((q[0].enqueued for q in self._queues.values() if q), default=None)
            if oldest is None:
                return
            remaining = max(oldest, self._model_free_since) + delay - loop.time()
            if remaining <= 0:
                return
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self, now: float) -> list[_Job[T, R]]:
        """Fill one batch, the backlogged client with the lowest tag first, dropping dead jobs on the way."""
        batch: list[_Job[T, R]] = []
        size = 0
        full = self.config.max_batch_images
        if self._contention is None:
            heavy, heavy_cap = frozenset(), full
        else:
            contention = self._contention.limit(self._queued_images, self._cost.fit, now)
            heavy, heavy_cap = contention.heavy, contention.heavy_batch_images
        holds_heavy = False
        while size < full:
            for client, queue in self._queues.items():
                self._drop_dead_heads(client, queue, now)
            smallest = min((n for n in self._queued_images.values() if n), default=0)
            chosen: tuple[tuple[int, bool, float], str] | None = None
            for client, queue in self._queues.items():
                if not queue:
                    continue
                cap = heavy_cap if holds_heavy or client in heavy else full
                if batch and size + queue[0].size > cap:  # an oversized job runs alone
                    continue
                # Lowest tag first; on a tie the light client, whose latency the limit protects, then
                # the job that arrived first.
                rank = (self._order_tag(client, queue, heavy, smallest), client in heavy, queue[0].enqueued)
                if chosen is None or rank < chosen[0]:
                    chosen = (rank, client)
            if chosen is None:
                break
            (tag, _, _), best = chosen
            job = self._queues[best][0]
            self._remove(job)
            started = self._request_tag.get(best)
            if started is None or started[0] != job.request:  # the first job of its request
                self._request_tag[best] = (job.request, self._served[best])
            self._virtual = max(self._virtual, tag)  # a job skipped for size can lag
            self._served[best] += job.size
            batch.append(job)
            size += job.size
            holds_heavy = holds_heavy or best in heavy
        self._forget_idle_clients()
        return batch

    def _order_tag(
        self, client: str, queue: collections.deque[_Job[T, R]], heavy: frozenset[str], smallest: int
    ) -> int:
        """The tag ``client``'s next job is ordered by: its count, or the count its request started at.

        Tags per job share every batch among the backlogged clients, like processor sharing. Among
        equal closed-loop clients that gains no one anything (with N images in flight, latency is N over
        the throughput either way) and costs full batches: each request is split over two batches, the
        second answers every client, they come back one after another, and the first one back runs alone
        after ``max_delay_ms`` (4 clients × 16 images on a 32-image model averaged batches of 27.7). So a
        started request keeps its start tag and finishes before later requests, as in FIFO; the clients
        stay spread over batches and each batch fills while the one before it runs.

        Only where that costs no one more than one batch, and never a smaller request: the client has
        one request queued, not more than a batch of it left, no more left than any other client has
        queued (``smallest``), and is not heavy (a flood's work stays interleaved job by job).
        """
        head = queue[0]
        started = self._request_tag.get(client)
        if (
            started is not None
            and started[0] == head.request == queue[-1].request
            and self._queued_images[client] <= min(smallest, self.config.max_batch_images)
            and client not in heavy
        ):
            return started[1]
        return self._served[client]

    def _drop_dead_heads(self, client: str, queue: collections.deque[_Job[T, R]], now: float) -> None:
        while queue:
            head = queue[0]
            if head.future.done():  # cancelled by its caller
                self._remove(head)
                self._notify_drop("cancelled", head.size)
            elif head.deadline is not None and now >= head.deadline:
                self._remove(head)
                head.future.set_exception(DeadlineExpired("deadline passed while the job was queued"))
                self._notify_drop("deadline", head.size)
            else:
                return

    def _forget_idle_clients(self) -> None:
        for client in [c for c, q in self._queues.items() if not q]:
            del self._queues[client]
            self._queued_images.pop(client, None)
            self._request_tag.pop(client, None)
        # An idle client's count matters only while it is ahead of the clock (it was just served).
        for client in [c for c, n in self._served.items() if c not in self._queues and n <= self._virtual]:
            del self._served[client]

    def _remove(self, job: _Job[T, R]) -> bool:
        queue = self._queues.get(job.client)
        if queue is None:
            return False
        try:
            queue.remove(job)
        except ValueError:
            return False
        self._queued_images[job.client] -= job.size
        self._total_queued -= job.size
        self._report_depth(job.client)
        return True

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Job[T, R]]) -> None:
        num_images = sum(job.size for job in batch)
        # While work is backlogged, the time between two batch ends is what a batch costs the queue:
        # the model's time plus the loop's between batches (answering, decoding, the flush delay).
        # Hints from the model's time alone were 3x too short on a 2-core machine (tries per request).
        service_from = self._model_free_since if self._backlog_at_free else loop.time()
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, [j.payload for j in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} jobs")
        except Exception as exc:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self._model_free_since = loop.time()
            self._backlog_at_free = self._total_queued > 0
            seconds = time.perf_counter() - started
            if self._observer is not None:
                self._observer.batch_done(num_images, len(batch), seconds)
        rate = num_images / max(self._model_free_since - service_from, seconds, 1e-6)
        self._images_per_s = rate if self._images_per_s is None else 0.8 * self._images_per_s + 0.2 * rate
        self._cost.observe(num_images, seconds)
        for job, result in zip(batch, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    # -- observation -------------------------------------------------------------------------------

    def _report_depth(self, client: str) -> None:
        if self._observer is not None:
            self._observer.queue_depth(client, self._queued_images.get(client, 0))

    def _notify_drop(self, reason: str, num_images: int) -> None:
        if self._observer is not None:
            self._observer.dropped(reason, num_images)


def _place(client: str, ticket: str | None) -> str | None:
    """The waitlist key of a call: the client's shared place without a ticket, the ticket's place with
    one (scoped to the client, so no one can take another's), none for a call's first try."""
    if ticket is None:
        return client
    return f"{client}\x00{ticket}" if ticket else None
