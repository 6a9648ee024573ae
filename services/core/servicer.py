"""The gRPC RewardService: converts messages, checks requests, maps failures to status codes.

All policy lives elsewhere (batcher: fairness and admission; codec: image limits; auth: tokens;
scorer: the model). Every failure becomes a status with a sentence saying what was wrong, and no
failure of one request affects another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from protos import reward_pb2, reward_pb2_grpc
from services.core.auth import AuthError, Principal, TokenAuthenticator
from services.core.batcher import BatcherClosed, DeadlineExpired, FairBatcher, QueueFull
from services.core.budget import DEFAULT_MAX_DECODED_PIXELS, BudgetExhausted, PixelBudget, Reservation
from services.core.codec import ImageError, ImageLimits, Reserve, decode_image, to_chw_tensor
from services.core.metrics import ServerMetrics
from services.core.packing import pack_groups
from services.core.quota import QuotaExceeded, QuotaLimiter
from services.core.runner import JobResult
from services.core.scorer import ModelIdentity, ScoreBatch, Scorer

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"
CLIENT_KEY = "x-e2po-client"
"""Metadata naming the caller on a server without auth; it keys the fairness queue only.

Channels to the same target share one HTTP/2 connection inside a gRPC process, so the peer address
cannot tell two trainers in one process apart; with auth on, the token's name is used instead."""


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """Per-request limits, checked before any work is queued."""

    max_images_per_request: int = 512
    """More images must be split by the client (the bundled client does this itself)."""
    max_request_bytes: int = 64 * 1024 * 1024
    """gRPC max receive message size; the client keeps its chunks well under it."""
    max_prompt_chars: int = 4096
    max_metadata_chars: int = 65536
    max_group_id_chars: int = 256
    max_pixels_per_request: int = 32 * 1024 * 1024
    """Decoded pixels of one request (≈100 MB as uint8 RGB). More than a raw request under
    ``max_request_bytes`` can carry, so it only bites on PNG/JPEG that expand far beyond their size."""
    image: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        if self.max_pixels_per_request < self.image.max_pixels:
            raise ValueError(
                f"max_pixels_per_request ({self.max_pixels_per_request}) must be >= the per-image "
                f"max_pixels ({self.image.max_pixels}), or the largest image could never be scored"
            )


class RequestError(ValueError):
    """The request is malformed; answered INVALID_ARGUMENT with this message."""


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
        super().__init__(message)
        self.code = code
        self.trailing = trailing


def model_info(identity: ModelIdentity, limits: RequestLimits) -> reward_pb2.ModelInfo:
    height, width = identity.preferred_size or (0, 0)
    return reward_pb2.ModelInfo(
        name=identity.name,
        version=identity.version,
        checkpoint_sha256=identity.checkpoint_sha256,
        outputs=list(identity.outputs),
        group_outputs=list(identity.group_outputs),
        preferred_height=height,
        preferred_width=width,
        max_images_per_request=limits.max_images_per_request,
        max_pixels_per_image=limits.image.max_pixels,
        max_request_bytes=limits.max_request_bytes,
        requires_metadata=identity.requires_metadata,
    )


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
    ) -> None:
        self.limits = limits
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
        return model_info(scorer.identity, self.limits)

    async def Score(
        self, request: reward_pb2.ScoreRequest | MalformedRequest, context: grpc.aio.ServicerContext
    ):
        started = time.perf_counter()
        client_label = "anonymous"
        code = grpc.StatusCode.OK
        num_samples = len(request.samples) if isinstance(request, reward_pb2.ScoreRequest) else 0
        try:
            principal = self._principal(context)
            client_label = principal.name if principal else "anonymous"
            _check_parsed(request)
            # With auth the queue is the team's; without, the caller's declared name or its address.
            fairness_key = client_label if principal else (_declared_client(context) or context.peer())
            scorer, batcher = self._ready()
            self._check_shape(request)
            rate = principal.images_per_s if principal else None
            return await self._admit_and_score(scorer, batcher, fairness_key, rate, request, context)
        except _Abort as abort:
            code = abort.code
            await context.abort(abort.code, str(abort), trailing_metadata=abort.trailing)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            # A bug, not a bad request: say so plainly (never UNKNOWN with a repr) and keep serving.
            code = grpc.StatusCode.INTERNAL
            log.exception("Score failed unexpectedly")
            await context.abort(code, "internal error while handling the request; the server log has details")
        finally:
            self.metrics.request_done(client_label, code.name, num_samples, time.perf_counter() - started)

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

    def _check_shape(self, request: reward_pb2.ScoreRequest) -> None:
        count = len(request.samples)
        if count == 0:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "request has no samples")
        if count > self.limits.max_images_per_request:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request has {count} samples, limit is {self.limits.max_images_per_request}; split it",
            )

    async def _admit_and_score(
        self,
        scorer: Scorer,
        batcher: FairBatcher[ScoreBatch, JobResult | Exception],
        client: str,
        rate: float | None,
        request: reward_pb2.ScoreRequest,
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
            self._check_admission(batcher, client, num_images)
            try:
                jobs = await asyncio.to_thread(self._decode, request, scorer, reservation.take)
            except RequestError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            except BudgetExhausted as exc:
                self.metrics.refused("memory")
                raise _exhausted(str(exc), batcher.estimated_wait_s()) from None
            results = await self._submit(batcher, client, jobs, context)
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

    def _check_admission(self, batcher: FairBatcher, client: str, num_images: int) -> None:
        """Refuse early, before spending time and memory on decoding, when the queue cannot take it."""
        try:
            batcher.check_admission(client, num_images)
        except QueueFull as exc:
            self.metrics.refused("queue_full")
            raise _exhausted(str(exc), exc.retry_after_s) from None
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    def _decode(
        self, request: reward_pb2.ScoreRequest, scorer: Scorer, reserve: Reserve
    ) -> list[tuple[list[int], ScoreBatch]]:
        """Decode and validate every sample (in a worker thread), then pack them into jobs.

        Returns (request indices, job) pairs: packing keeps groups together, so a job's samples need
        not be contiguous in the request.
        """
        limits = self.limits
        identity = scorer.identity
        images, prompts, metadata, group_ids = [], [], [], []
        for index, sample in enumerate(request.samples):
            where = f"sample {index}"
            if not sample.HasField("image"):
                raise RequestError(f"{where}: no image")
            try:
                images.append(to_chw_tensor(decode_image(sample.image, limits.image, reserve=reserve)))
            except ImageError as exc:
                raise RequestError(f"{where}: {exc}") from None
            if len(sample.prompt) > limits.max_prompt_chars:
                raise RequestError(
                    f"{where}: prompt has {len(sample.prompt)} chars, limit {limits.max_prompt_chars}"
                )
            if len(sample.group_id) > limits.max_group_id_chars:
                raise RequestError(f"{where}: group_id longer than {limits.max_group_id_chars} chars")
            meta = _parse_metadata(sample.metadata_json, limits.max_metadata_chars, where)
            if meta is None and identity.requires_metadata:
                raise RequestError(f"{where}: model {identity.name!r} requires metadata_json")
            try:
                scorer.validate(sample.prompt, meta)
            except ValueError as exc:
                raise RequestError(f"{where}: {exc}") from None
            prompts.append(sample.prompt)
            metadata.append(meta)
            group_ids.append(sample.group_id)
        batch_size = self.batcher.config.max_batch_images if self.batcher else len(images)
        return [
            (
                indices,
                ScoreBatch(
                    images=[images[i] for i in indices],
                    prompts=[prompts[i] for i in indices],
                    metadata=[metadata[i] for i in indices],
                    group_ids=[group_ids[i] for i in indices],
                ),
            )
            for indices in pack_groups(group_ids, max_count=batch_size)
        ]

    async def _submit(
        self,
        batcher: FairBatcher[ScoreBatch, JobResult | Exception],
        client: str,
        jobs: list[tuple[list[int], ScoreBatch]],
        context: grpc.aio.ServicerContext,
    ) -> list[JobResult | Exception]:
        try:
            return await batcher.submit(
                client, [(job, len(job)) for _, job in jobs], timeout_s=context.time_remaining()
            )
        except QueueFull as exc:
            self.metrics.refused("queue_full")
            raise _exhausted(str(exc), exc.retry_after_s) from None
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
        per_sample: list[dict[str, float]] = [{} for _ in range(num_samples)]
        response = reward_pb2.ScoreResponse(model=model_info(scorer.identity, self.limits))
        for (indices, _), result in zip(jobs, results, strict=True):
            if isinstance(result, ValueError):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"scorer rejected the input: {result}")
            if isinstance(result, Exception):
                log.error("scorer %s failed", scorer.identity.name, exc_info=result)
                raise _Abort(grpc.StatusCode.INTERNAL, f"scorer failed: {type(result).__name__}: {result}")
            for position, index in enumerate(indices):
                per_sample[index] = {name: float(values[position]) for name, values in result.samples.items()}
            for gid, values in result.groups.items():
                response.groups.add(group_id=gid, values=values)
        for values in per_sample:
            response.scores.add().values.update(values)
        return response


def _exhausted(message: str, retry_after_s: float) -> _Abort:
    """RESOURCE_EXHAUSTED with the wait in the message and as ``retry-after-ms`` trailing metadata."""
    retry_ms = str(max(1, round(retry_after_s * 1000)))
    return _Abort(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{message}; retry after {retry_ms} ms",
        ((RETRY_AFTER_KEY, retry_ms),),
    )


def _check_parsed(request: Message | MalformedRequest) -> None:
    if isinstance(request, MalformedRequest):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid message: {request.error}")


def _lenient(message_type: type[Message]) -> Any:
    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return MalformedRequest(str(exc))

    return parse


def add_to_server(servicer: RewardServicer, server: grpc.aio.Server) -> None:
    """Register the RewardService like the generated ``add_RewardServiceServicer_to_server``, but with
    deserializers that turn an unparsable body into a :class:`MalformedRequest` (INVALID_ARGUMENT)."""
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score,
            request_deserializer=_lenient(reward_pb2.ScoreRequest),
            response_serializer=reward_pb2.ScoreResponse.SerializeToString,
        ),
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe,
            request_deserializer=_lenient(reward_pb2.DescribeRequest),
            response_serializer=reward_pb2.ModelInfo.SerializeToString,
        ),
    }
    service = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def _declared_client(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_KEY and isinstance(value, str) and value:
            return "declared:" + value[:64]
    return None


def _parse_metadata(text: str, max_chars: int, where: str) -> Mapping[str, Any] | None:
    if not text:
        return None
    if len(text) > max_chars:
        raise RequestError(f"{where}: metadata_json has {len(text)} chars, limit {max_chars}")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError also covers ints over Python's digit limit
        raise RequestError(f"{where}: metadata_json is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise RequestError(f"{where}: metadata_json must be a JSON object, got {type(value).__name__}")
    return value
