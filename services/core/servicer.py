"""The gRPC RewardService: converts messages, checks requests, maps failures to status codes.

All policy lives elsewhere (batcher: fairness and admission; codec: image limits; auth: tokens;
scorer: the model). Every failure becomes a status with a sentence saying what was wrong, and no
failure of one request affects another.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from protos import reward_pb2, reward_pb2_grpc
from services.core.auth import AuthError, Principal, TokenAuthenticator
from services.core.batcher import BatcherClosed, DeadlineExpired, FairBatcher, QueueFull
from services.core.budget import DEFAULT_MAX_DECODED_PIXELS, BudgetExhausted, PixelBudget, Reservation
from services.core.codec import Reserve
from services.core.metadata_keys import (
    CLIENT_KEY,
    MAX_TICKET_CHARS,
    NEW_TICKET,
    RETRY_AFTER_KEY,
    RETRY_TICKET_KEY,
)
from services.core.metrics import ServerMetrics
from services.core.packing import pack_groups
from services.core.quota import QuotaExceeded, QuotaLimiter
from services.core.quote import clip
from services.core.request import (
    RequestError,
    RequestLimits,
    check_sample_count,
    decode_samples,
    model_info,
    score_response,
)
from services.core.runner import JobResult
from services.core.scorer import ScoreBatch, Scorer
from services.core.wire import ReadBounds, RequestTooLarge, WireRequest, WireSample, parse_request

log = logging.getLogger(__name__)


INLINE_PARSE_BYTES = 1024 * 1024
"""Bodies up to this size are read on the event loop, larger ones in a worker thread. Reading takes at
most ~5,700 field steps whatever the size (``ReadBounds``: ≤ 15 ms, in a thread too, as it holds the
GIL); what grows with size is text decoding and the protobuf library's copy, ≤ 1 ms per MB. Small
requests thus never queue for the worker threads that other callers' large bodies occupy to be read."""


@dataclass(frozen=True, kw_only=True)
class IntakeLimits:
    """What a caller may hold open on the server before its request is even read: the bounds a slow,
    stalled or hostile client meets, so that it cannot tie up memory or slots that other teams need."""

    stream_idle_timeout_s: float = 30.0
    """A ScoreStream that sends no part for this long is closed (DEADLINE_EXCEEDED)."""
    max_streams_per_client: int = 64
    """ScoreStream calls one client (token name; without auth, declared name or peer) may have open at
    once; more are refused with RESOURCE_EXHAUSTED. 8 trainer ranks × 4 concurrent requests need 32."""
    max_buffered_request_bytes: int = 2 * 1024**3
    """Request bodies held at once over all calls (whole Score bodies and the parts streams have sent
    so far), in bytes; past it, RESOURCE_EXHAUSTED. With ``max_decoded_pixels`` the server's memory bound."""

    def __post_init__(self) -> None:
        if not self.stream_idle_timeout_s > 0:
            raise ValueError(f"stream_idle_timeout_s must be > 0, got {self.stream_idle_timeout_s}")
        if self.max_streams_per_client < 1:
            raise ValueError(f"max_streams_per_client must be >= 1, got {self.max_streams_per_client}")
        if self.max_buffered_request_bytes < 1:
            raise ValueError(
                f"max_buffered_request_bytes must be >= 1, got {self.max_buffered_request_bytes}"
            )


@dataclass(frozen=True)
class MalformedRequest:
    """A request body that is not a valid message (corrupt bytes, bad UTF-8 in a string field).

    gRPC answers UNKNOWN when a deserializer raises; handing the handler this instead lets it answer
    INVALID_ARGUMENT — after authentication, so an anonymous caller learns nothing about parsing."""

    error: str


class _Abort(Exception):
    def __init__(
        self, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(clip(message))
        self.code = code
        self.trailing = trailing


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """Serves one scorer; ``attach`` is called once the model has loaded."""

    def __init__(
        self,
        *,
        limits: RequestLimits,
        metrics: ServerMetrics,
        auth: TokenAuthenticator | None,
        model_name: str,
        pixel_budget: PixelBudget | None = None,
        quota: QuotaLimiter | None = None,
        intake: IntakeLimits | None = None,
    ) -> None:
        self.limits = limits
        self.intake = intake or IntakeLimits()
        self.body_budget = PixelBudget(self.intake.max_buffered_request_bytes, unit="request bytes")
        self._open_streams: dict[str, int] = {}
        self.metrics = metrics
        self.auth = auth
        self.model_name = model_name
        self.pixel_budget = pixel_budget or PixelBudget(DEFAULT_MAX_DECODED_PIXELS)
        self.quota = quota
        self.scorer: Scorer | None = None
        self.batcher: FairBatcher[ScoreBatch, JobResult | Exception] | None = None
        self.draining = False

    def attach(self, scorer: Scorer, batcher: FairBatcher[ScoreBatch, JobResult | Exception]) -> None:
        self.scorer = scorer
        self.batcher = batcher

    # -- RPCs --------------------------------------------------------------------------------------

    async def Describe(
        self, request: reward_pb2.DescribeRequest | MalformedRequest, context: grpc.aio.ServicerContext
    ):
        try:
            self._principal(context)
            _check_parsed(request)
            scorer, _ = self._ready()
        except _Abort as abort:
            await context.abort(abort.code, str(abort))
        info = model_info(scorer.identity, self.limits)
        info.accepts_score_stream = True  # said here, not in every answer's ModelInfo (TorchServe shares it)
        return info

    async def Score(self, body: bytes, context: grpc.aio.ServicerContext):
        unread = [body]  # handed over, so this frame does not hold the body once it is read
        del body

        async def read(held: Reservation) -> WireRequest:
            data = unread.pop()
            held.take(len(data))
            return await self._parse(data)

        return await self._score(read, context)

    async def ScoreStream(self, parts: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        return await self._score(lambda held: self._read_parts(parts, held), context, stream=True)

    async def _score(
        self,
        read: Callable[[Reservation], Awaitable[WireRequest]],
        context: grpc.aio.ServicerContext,
        *,
        stream: bool = False,
    ):
        """Both Score RPCs: authenticate (from metadata alone), read the body within its bounds, check
        it, queue it, answer. Nothing of the body is read before the caller is known."""
        started = time.perf_counter()
        client_label = "anonymous"
        code = grpc.StatusCode.OK
        num_samples = 0
        held = Reservation(self.body_budget, self.limits.max_request_bytes)
        fairness_key: str | None = None
        stream_slot: str | None = None  # the client whose stream slot this call holds, once taken
        try:
            principal = self._principal(context)
            client_label = principal.name if principal else "anonymous"
            # With auth the queue is the team's; without, the caller's declared name or its address.
            fairness_key = client_label if principal else (_declared_client(context) or context.peer())
            if stream:
                self._open_stream(fairness_key)
                stream_slot = fairness_key
            request = await read(held)
            num_samples = len(request.samples)
            scorer, batcher = self._ready()
            self._check_shape(request)
            rate = principal.images_per_s if principal else None
            return await self._admit_and_score(scorer, batcher, fairness_key, rate, request, context)
        except _Abort as abort:
            code = abort.code
            _forget_locals(abort)
            await context.abort(abort.code, str(abort), trailing_metadata=abort.trailing)
        except BudgetExhausted as exc:  # the buffered-bytes budget (the pixel one is handled inside)
            _forget_locals(exc)
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            self.metrics.refused("memory")
            abort = _exhausted(str(exc), 1.0)
            await context.abort(abort.code, str(abort), trailing_metadata=abort.trailing)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            # A bug, not a bad request: say so plainly (never UNKNOWN with a repr) and keep serving.
            code = grpc.StatusCode.INTERNAL
            log.exception("Score failed unexpectedly")
            _forget_locals(exc)
            await context.abort(code, "internal error while handling the request; the server log has details")
        finally:
            request = None  # this frame outlives the call when an abort leaves it in a cycle
            held.release()
            if stream_slot is not None:  # a refused stream never held a slot, so it must not free one
                self._close_stream(stream_slot)
            self.metrics.request_done(client_label, code.name, num_samples, time.perf_counter() - started)

    def _open_stream(self, client: str) -> None:
        limit = self.intake.max_streams_per_client
        if self._open_streams.get(client, 0) >= limit:
            self.metrics.refused("streams")
            raise _exhausted(f"client already has {limit} ScoreStream calls open, the limit", 1.0)
        self._open_streams[client] = self._open_streams.get(client, 0) + 1

    def _close_stream(self, client: str) -> None:
        left = self._open_streams.get(client, 0) - 1
        if left > 0:
            self._open_streams[client] = left
        else:
            self._open_streams.pop(client, None)

    async def _parse(self, body: bytes, samples_before: int = 0) -> WireRequest:
        """One body (a Score request or a stream's part after ``samples_before`` samples), read within
        :class:`ReadBounds` (samples, fields), off the event loop when large."""
        bounds = ReadBounds.for_samples(self.limits.max_images_per_request, samples_before)
        try:
            if len(body) <= INLINE_PARSE_BYTES:
                return parse_request(body, bounds)
            return await asyncio.to_thread(parse_request, body, bounds)
        except DecodeError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid message: {exc}") from None
        except RequestTooLarge as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    async def _read_parts(self, parts: AsyncIterator[bytes], held: Reservation) -> WireRequest:
        """A streamed request's parts as one request, refused as soon as it outgrows the limits that
        bound a request sent whole (its bytes, its samples), so no more of it is read. Parts are
        bounded too (as many as samples allowed): a stream of empty parts would otherwise never end;
        and a stream that stalls is closed after ``stream_idle_timeout_s``. The parts received so far
        count against the server's buffered-bytes budget."""
        samples: list[WireSample] = []
        num_bytes = num_parts = 0
        limit = self.limits.max_images_per_request
        timeout = self.intake.stream_idle_timeout_s
        incoming = aiter(parts)
        while True:
            try:
                part = await asyncio.wait_for(anext(incoming), timeout)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise _Abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"stream sent no part for {timeout:g} s (the server's stream idle timeout); closed",
                ) from None
            num_parts += 1
            if num_parts > limit:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"streamed request has more than {limit} parts, the most samples a request may have",
                )
            num_bytes += len(part)
            if num_bytes > self.limits.max_request_bytes:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"streamed request has more than {self.limits.max_request_bytes} bytes, the limit "
                    "of one request; split it",
                )
            held.take(len(part))
            request = await self._parse(part, len(samples))
            samples.extend(request.samples)
        return WireRequest(samples=tuple(samples))

    # -- steps -------------------------------------------------------------------------------------

    def _principal(self, context: grpc.aio.ServicerContext) -> Principal | None:
        if self.auth is None:
            return None
        try:
            return self.auth.authenticate(context.invocation_metadata() or (), self.model_name)
        except AuthError as exc:
            code = grpc.StatusCode.PERMISSION_DENIED if exc.permission else grpc.StatusCode.UNAUTHENTICATED
            raise _Abort(code, str(exc)) from None

    def _ready(self) -> tuple[Scorer, FairBatcher[ScoreBatch, JobResult | Exception]]:
        if self.draining:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another replica")
        if self.scorer is None or self.batcher is None:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"model {self.model_name!r} is still loading")
        return self.scorer, self.batcher

    def _check_shape(self, request: WireRequest) -> None:
        try:
            check_sample_count(request, self.limits)
        except RequestError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    async def _admit_and_score(
        self,
        scorer: Scorer,
        batcher: FairBatcher[ScoreBatch, JobResult | Exception],
        client: str,
        rate: float | None,
        request: WireRequest,
        context: grpc.aio.ServicerContext,
    ) -> reward_pb2.ScoreResponse:
        """Quota, queue room and memory first; then decode, queue, and answer.

        Only images that reach the model count against the quota: a request refused on the way is
        refunded. Its decoded pixels are held against the server's budget until it is answered.
        """
        num_images = len(request.samples)
        self._charge_quota(client, num_images, rate)
        reservation = Reservation(self.pixel_budget, self.limits.max_pixels_per_request)
        try:
            ticket = _retry_ticket(context)
            self._check_admission(batcher, client, num_images, ticket)
            try:
                jobs = await asyncio.to_thread(self._decode, request, scorer, reservation.take)
            except RequestError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            except BudgetExhausted as exc:
                self.metrics.refused("memory")
                raise _exhausted(str(exc), batcher.estimated_wait_s()) from None
            results = await self._submit(batcher, client, jobs, context, ticket)
        except BaseException:
            if self.quota is not None:
                self.quota.refund(client, num_images)
            raise
        finally:
            reservation.release()
        return self._response(scorer, jobs, results)

    def _charge_quota(self, client: str, num_images: int, rate: float | None) -> None:
        if self.quota is None:
            return
        try:
            self.quota.charge(client, num_images, rate)
        except QuotaExceeded as exc:
            self.metrics.refused("quota")
            raise _exhausted(str(exc), exc.retry_after_s) from None

    def _check_admission(
        self, batcher: FairBatcher, client: str, num_images: int, ticket: str | None
    ) -> None:
        """Refuse early, before spending time and memory on decoding, when the queue cannot take it."""
        try:
            batcher.check_admission(client, num_images, ticket)
        except QueueFull as exc:
            self.metrics.refused("queue_full")
            raise _exhausted(str(exc), exc.retry_after_s, exc.ticket) from None
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    def _decode(
        self, request: WireRequest, scorer: Scorer, reserve: Reserve
    ) -> list[tuple[list[int], ScoreBatch]]:
        """Decode and validate every sample (in a worker thread), then pack them into jobs.

        Returns (request indices, job) pairs: packing keeps groups together, so a job's samples need
        not be contiguous in the request.
        """
        batch = decode_samples(request, scorer, self.limits, reserve)
        job_images = self.batcher.config.job_images if self.batcher else len(batch)
        return [
            (indices, batch.select(indices)) for indices in pack_groups(batch.group_ids, max_count=job_images)
        ]

    async def _submit(
        self,
        batcher: FairBatcher[ScoreBatch, JobResult | Exception],
        client: str,
        jobs: list[tuple[list[int], ScoreBatch]],
        context: grpc.aio.ServicerContext,
        ticket: str | None,
    ) -> list[JobResult | Exception]:
        try:
            return await batcher.submit(
                client,
                [(job, len(job)) for _, job in jobs],
                timeout_s=context.time_remaining(),
                ticket=ticket,
            )
        except QueueFull as exc:
            self.metrics.refused("queue_full")
            raise _exhausted(str(exc), exc.retry_after_s, exc.ticket) from None
        except ValueError as exc:  # a request that can never fit the queue
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except DeadlineExpired as exc:
            raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
        except BatcherClosed as exc:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, str(exc)) from None

    def _response(
        self,
        scorer: Scorer,
        jobs: list[tuple[list[int], ScoreBatch]],
        results: list[JobResult | Exception],
    ) -> reward_pb2.ScoreResponse:
        num_samples = sum(len(indices) for indices, _ in jobs)
        for result in results:
            if isinstance(result, ValueError):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"scorer rejected the input: {result}")
            if isinstance(result, Exception):
                log.error("scorer %s failed", scorer.identity.name, exc_info=result)
                raise _Abort(grpc.StatusCode.INTERNAL, f"scorer failed: {type(result).__name__}: {result}")
        parts = [(indices, result) for (indices, _), result in zip(jobs, results, strict=True)]
        return score_response(parts, num_samples, scorer, self.limits)


def _forget_locals(exc: BaseException) -> None:
    """Drop the locals of the frames ``exc`` came through, a request's body and samples among them.

    grpc's aio server keeps the exception that ``context.abort`` raises in a reference cycle with these
    frames, which only the garbage collector breaks, and bytes do not count towards its thresholds: a
    stalled 47 MB stream part stayed in memory after its call ended, and eight of them at a time grew
    the server by ~1 GB a round (docs/reliability.md). Frames still running are left alone.
    """
    traceback.clear_frames(exc.__traceback__)


def _exhausted(message: str, retry_after_s: float, ticket: str | None = None) -> _Abort:
    """RESOURCE_EXHAUSTED with the wait in the message and as ``retry-after-ms`` trailing metadata, and
    the place in line the retry should name, if the refusal took one."""
    retry_ms = str(max(1, round(retry_after_s * 1000)))
    trailing = ((RETRY_AFTER_KEY, retry_ms),) + (((RETRY_TICKET_KEY, ticket),) if ticket else ())
    return _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{message}; retry after {retry_ms} ms", trailing)


def _check_parsed(request: object) -> None:
    if isinstance(request, MalformedRequest):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid message: {request.error}")


def _lenient(parse_bytes: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return parse_bytes(data)
        except DecodeError as exc:
            return MalformedRequest(str(exc))

    return parse


def add_to_server(servicer: RewardServicer, server: grpc.aio.Server) -> None:
    """Register the RewardService like the generated ``add_RewardServiceServicer_to_server``, but with
    the Score bodies left as bytes and a Describe deserializer that turns an unparsable body into a
    :class:`MalformedRequest` (INVALID_ARGUMENT)."""
    handlers = {
        # No deserializer: the handlers get the body's bytes and read them only once the caller is
        # authenticated, within bounds (images stay views of those bytes: services.core.wire).
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score, response_serializer=reward_pb2.ScoreResponse.SerializeToString
        ),
        "ScoreStream": grpc.stream_unary_rpc_method_handler(
            servicer.ScoreStream, response_serializer=reward_pb2.ScoreResponse.SerializeToString
        ),
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe,
            request_deserializer=_lenient(reward_pb2.DescribeRequest.FromString),
            response_serializer=reward_pb2.ModelInfo.SerializeToString,
        ),
    }
    service = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def _metadata_value(context: grpc.aio.ServicerContext, wanted: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == wanted and isinstance(value, str):
            return value
    return None


def _retry_ticket(context: grpc.aio.ServicerContext) -> str | None:
    """The call's place in line: None (not sent: the client's shared place), "" (a first try) or the
    ticket of its last refusal."""
    value = _metadata_value(context, RETRY_TICKET_KEY)
    if value is None:
        return None
    return "" if value == NEW_TICKET else value[:MAX_TICKET_CHARS]


def _declared_client(context: grpc.aio.ServicerContext) -> str | None:
    value = _metadata_value(context, CLIENT_KEY)
    return "declared:" + value[:64] if value else None
