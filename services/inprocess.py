"""A reward client that scores with a scorer object in this process, through the server's own checks.

For callers that want a reward without a service: tests of the trainer that are not about transport,
and notebooks. The images and their fields take the path a request takes inside a server, minus the
socket: the gRPC client's argument checks and raw-RGB8 encoding, the server's bounded reader, its
per-sample decoding and validation (the same INVALID_ARGUMENT sentences), and its batch runner with
the output check. So a score from here is the score the service would return for the same call,
and a call the service would refuse raises the same :class:`RewardError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from protos import reward_pb2
from services.client import ImageLike, RewardError, Scores, encode_samples
from services.core.request import RequestError, RequestLimits, decode_samples, model_info
from services.core.runner import run_jobs
from services.core.scorer import Scorer
from services.core.wire import parse_request, serialize_parts


class InProcessRewardClient:
    """:class:`services.client.RewardClient` over ``scorer``; calls run one at a time in a thread."""

    def __init__(self, scorer: Scorer, limits: RequestLimits | None = None) -> None:
        self.scorer = scorer
        self.limits = limits or RequestLimits()
        self._lock = asyncio.Lock()  # a scorer scores one batch at a time, as under the batcher

    async def describe(self, *, timeout_s: float | None = None) -> reward_pb2.ModelInfo:
        return model_info(self.scorer.identity, self.limits)

    async def score(
        self,
        images: Sequence[ImageLike] | ImageLike,
        prompts: Sequence[str] | str,
        *,
        metadata: Sequence[Mapping[str, Any] | str | None] | None = None,
        group_ids: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> Scores:
        try:
            samples = encode_samples(images, prompts, metadata, group_ids)
        except ValueError as exc:
            raise RewardError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        async with self._lock:
            return await asyncio.wait_for(asyncio.to_thread(self._score, samples), timeout_s)

    def _score(self, samples: list) -> Scores:
        (body,) = serialize_parts(samples, None)
        try:
            batch = decode_samples(parse_request(body), self.scorer, self.limits, reserve=lambda pixels: None)
        except RequestError as exc:
            raise RewardError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        (result,) = run_jobs(self.scorer, [batch])
        if isinstance(result, Exception):
            raise RewardError(
                grpc.StatusCode.INTERNAL, f"scorer {self.scorer.identity.name} failed: {result}"
            )
        return Scores(
            values=result.samples,
            groups=result.groups,
            model=model_info(self.scorer.identity, self.limits),
        )

    async def close(self) -> None:
        return None
