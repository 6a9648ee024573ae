"""Async clients for reward services, and a command line for humans.

:class:`RewardClient` is what a caller of a reward needs (describe, score, close); the trainer scores
every rollout chunk through one. :class:`GrpcRewardClient` is the one for a service: big batches are
split into requests under the server's limits (whole groups kept together), the requests run concurrently, and
UNAVAILABLE / RESOURCE_EXHAUSTED answers are retried with jittered exponential backoff (honouring the
server's ``retry-after-ms`` hint) until the call's deadline. A score is only ever what a server
returned: when retries run out the call raises :class:`RewardError`, it never fills in a value.

    python -m services.client describe --endpoint localhost:50051
    python -m services.client score --endpoint localhost:50051 --image a.png --image b.png --prompt "a cat"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np
import torch

from protos import reward_pb2, reward_pb2_grpc
from services.core.codec import as_hwc_uint8, encode_file_bytes
from services.core.metadata_keys import CLIENT_KEY, NEW_TICKET, RETRY_AFTER_KEY, RETRY_TICKET_KEY, bearer
from services.core.packing import pack_groups
from services.core.tls import handshake_failure, load_ca, load_key_pair
from services.core.wire import (
    SCORE_METHOD,
    SCORE_STREAM_METHOD,
    EncodedSample,
    encode_sample,
    serialize_parts,
)

TOKEN_ENV = "E2PO_REWARD_TOKEN"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
STREAM_PART_BYTES = 4 * 1024 * 1024
"""Default part size of a ScoreStream: requests over it are streamed in parts this large."""


class RewardError(Exception):
    """A reward could not be obtained; carries the server's status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Retries of UNAVAILABLE / RESOURCE_EXHAUSTED; other codes fail at once."""

    max_attempts: int = 10
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    multiplier: float = 2.0

    def backoff(self, attempt: int, hint_s: float | None) -> float:
        """Full-jitter exponential backoff, never shorter than the server's hint."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt)
        delay = random.uniform(0.0, cap)
        return max(delay, hint_s) if hint_s is not None else delay


@dataclass(frozen=True, kw_only=True)
class ClientTLS:
    """Server CA to trust, and for mTLS the client's own certificate and key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate and its key go together (--tls-cert and --tls-key)")

    def credentials(self) -> grpc.ChannelCredentials:
        """Credentials from files checked first (``services.core.tls``): a bad file is a sentence
        naming it, not an opaque "failed to connect to all addresses" at the first call."""
        ca = load_ca(self.ca, "CA") if self.ca else None
        key = chain = None
        if self.cert is not None and self.key is not None:
            key, chain = load_key_pair(self.cert, self.key, "client")
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)


@dataclass(kw_only=True)
class Scores:
    """Scores for one call: output name → (B,) float64 array in input order, plus per-group outputs."""

    values: dict[str, np.ndarray]
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    model: reward_pb2.ModelInfo = field(default_factory=reward_pb2.ModelInfo)

    def __len__(self) -> int:
        return len(next(iter(self.values.values()))) if self.values else 0


ImageLike = np.ndarray | torch.Tensor


class RewardClient(Protocol):
    """A reward as its callers see it, whatever carries the images: over gRPC to a service
    (:class:`GrpcRewardClient`) or to a scorer object in this process
    (:class:`services.inprocess.InProcessRewardClient`). Failures raise :class:`RewardError`."""

    async def describe(self, *, timeout_s: float | None = None) -> reward_pb2.ModelInfo:
        """The model's identity, outputs and limits."""
        ...

    async def score(
        self,
        images: Sequence[ImageLike] | ImageLike,
        prompts: Sequence[str] | str,
        *,
        metadata: Sequence[Mapping[str, Any] | str | None] | None = None,
        group_ids: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> Scores:
        """Scores of ``images`` (uint8 or float in [0, 1]; CHW or HWC) against their prompts."""
        ...

    async def close(self) -> None: ...


class GrpcRewardClient:
    """Client of one reward endpoint. Use as ``async with GrpcRewardClient(...) as client``."""

    def __init__(
        self,
        endpoint: str,
        *,
        token: str | None = None,
        tls: ClientTLS | None = None,
        max_chunk_bytes: int = 32 * 1024 * 1024,
        stream_part_bytes: int | None = STREAM_PART_BYTES,
        max_concurrent_requests: int = 4,
        retry: RetryPolicy | None = None,
        timeout_s: float | None = 300.0,
        client_name: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self.max_chunk_bytes = max_chunk_bytes
        if stream_part_bytes is not None and stream_part_bytes < 1:
            raise ValueError(f"stream_part_bytes must be >= 1 or None, got {stream_part_bytes}")
        # A request over this size goes as a ScoreStream of parts this large: gRPC alone moves a 25-MB
        # request of 512² images in 0.36 ms per image so, 0.47 as one message (docs/benchmarks.md §2).
        # None: always one message.
        self.stream_part_bytes = stream_part_bytes
        # Without auth the server queues fairly by this name; with auth, by the token's name.
        name = client_name or f"{socket.gethostname()}:{os.getpid()}"
        self._metadata: tuple[tuple[str, str], ...] = ((CLIENT_KEY, name), *bearer(token))
        self._semaphore = asyncio.Semaphore(max_concurrent_requests)
        options = [
            ("grpc.max_send_message_length", max_chunk_bytes + 4 * 1024 * 1024),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]
        self._plaintext = tls is None
        if tls is None:
            self._channel = grpc.aio.insecure_channel(endpoint, options=options)
        else:
            self._channel = grpc.aio.secure_channel(endpoint, tls.credentials(), options=options)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)
        # Score requests are serialised by services.core.wire (one copy of the pixels) and sent as bytes.
        self._score_bytes = self._channel.unary_unary(
            SCORE_METHOD, request_serializer=None, response_deserializer=reward_pb2.ScoreResponse.FromString
        )
        self._score_stream = self._channel.stream_unary(
            SCORE_STREAM_METHOD,
            request_serializer=None,
            response_deserializer=reward_pb2.ScoreResponse.FromString,
        )
        self._info: reward_pb2.ModelInfo | None = None

    async def __aenter__(self) -> GrpcRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def describe(self, *, timeout_s: float | None = None) -> reward_pb2.ModelInfo:
        """The served model's identity and limits (cached after the first success)."""
        deadline = _deadline(timeout_s if timeout_s is not None else self.timeout_s)
        info = await self._call(self._stub.Describe, reward_pb2.DescribeRequest(), deadline)
        self._info = info
        return info

    async def score(
        self,
        images: Sequence[ImageLike] | ImageLike,
        prompts: Sequence[str] | str,
        *,
        metadata: Sequence[Mapping[str, Any] | str | None] | None = None,
        group_ids: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> Scores:
        """Score images (uint8 or float in [0, 1]; CHW or HWC; a batch tensor or a list).

        ``prompts`` is one prompt per image, or a single string for all of them.
        """
        deadline = _deadline(timeout_s if timeout_s is not None else self.timeout_s)
        samples = await asyncio.to_thread(encode_samples, images, prompts, metadata, group_ids)
        info = self._info or await self._call(self._stub.Describe, reward_pb2.DescribeRequest(), deadline)
        self._info = info
        max_bytes = min(self.max_chunk_bytes, int(info.max_request_bytes * 0.9) or self.max_chunk_bytes)
        parts = pack_groups(
            [s.group_id for s in samples],
            max_count=info.max_images_per_request or len(samples),
            weights=[s.size for s in samples],
            max_weight=max_bytes,
        )
        # All parts are serialised before the first is sent: the caller's arrays are read only during
        # this step, and a retry re-sends the same bytes. A server that does not say it accepts
        # ScoreStream (one from before it) gets each request as one message.
        part_bytes = self.stream_part_bytes if info.accepts_score_stream else None
        requests = await asyncio.to_thread(
            lambda: [serialize_parts([samples[i] for i in part], part_bytes) for part in parts]
        )
        responses = await asyncio.gather(*(self._score_part(messages, deadline) for messages in requests))
        return _merge(parts, responses, len(samples))

    async def _score_part(self, messages: list[bytes], deadline: float | None) -> reward_pb2.ScoreResponse:
        """One request: a ScoreStream of ``messages``, or Score when it is one message."""
        async with self._semaphore:
            if len(messages) > 1:
                return await self._call(self._score_stream, messages, deadline)
            return await self._call(self._score_bytes, messages[0], deadline)

    async def _call(self, method: Any, request: Any, deadline: float | None) -> Any:
        """One RPC with retries on UNAVAILABLE / RESOURCE_EXHAUSTED until attempts or deadline run out."""
        loop = asyncio.get_running_loop()
        attempt = 0
        ticket = NEW_TICKET  # the call's place in line once a full queue refused it
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise RewardError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer from {self.endpoint} in time"
                )
            try:
                metadata = (*self._metadata, (RETRY_TICKET_KEY, ticket))
                return await method(request, timeout=remaining, metadata=metadata)
            except grpc.aio.AioRpcError as err:
                code = err.code()
                ticket = _trailing(err, RETRY_TICKET_KEY) or NEW_TICKET
                attempt += 1
                cause = (
                    handshake_failure(err.details() or "") if code == grpc.StatusCode.UNAVAILABLE else None
                )
                if cause is not None:  # a certificate problem: retrying cannot fix it
                    raise RewardError(code, f"TLS handshake with {self.endpoint} failed: {cause}") from None
                if code not in RETRYABLE or attempt >= self.retry.max_attempts:
                    raise RewardError(code, self._explained(err)) from None
                delay = self.retry.backoff(attempt - 1, _retry_hint(err))
                if remaining is not None and delay >= remaining:
                    raise RewardError(code, f"{err.details()} (deadline reached while retrying)") from None
                await asyncio.sleep(delay)

    def _explained(self, err: grpc.aio.AioRpcError) -> str:
        details = err.details() or ""
        if self._plaintext and err.code() == grpc.StatusCode.UNAVAILABLE and "Socket closed" in details:
            return f"{details} (the server closed the connection at once: if it serves TLS, pass its CA)"
        return details


def _deadline(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s


def _trailing(err: grpc.aio.AioRpcError, wanted: str) -> str | None:
    for key, value in err.trailing_metadata() or ():
        if key == wanted and isinstance(value, str):
            return value
    return None


def _retry_hint(err: grpc.aio.AioRpcError) -> float | None:
    try:
        return float(_trailing(err, RETRY_AFTER_KEY) or "") / 1000.0
    except ValueError:
        return None


def encode_samples(
    images: Sequence[ImageLike] | ImageLike,
    prompts: Sequence[str] | str,
    metadata: Sequence[Mapping[str, Any] | str | None] | None,
    group_ids: Sequence[str] | None,
) -> list[EncodedSample]:
    """Check a score call's arguments and encode each image with its fields as a raw-RGB8 sample."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3:
        raise ValueError("pass a batch (B, ...) or a list of images, not a single 3-D image")
    count = len(images)
    if count == 0:
        raise ValueError("no images to score")
    if isinstance(prompts, str):
        prompts = [prompts] * count
    for name, values in (("prompts", prompts), ("metadata", metadata), ("group_ids", group_ids)):
        if values is not None and len(values) != count:
            raise ValueError(f"{name} has {len(values)} entries for {count} images")
    samples = []
    for i in range(count):
        meta = metadata[i] if metadata is not None else None
        samples.append(
            encode_sample(
                as_hwc_uint8(images[i]),
                prompts[i],
                meta if isinstance(meta, str) else (json.dumps(meta) if meta is not None else ""),
                group_ids[i] if group_ids is not None else "",
            )
        )
    return samples


def _merge(parts: list[list[int]], responses: Sequence[reward_pb2.ScoreResponse], count: int) -> Scores:
    """Reassemble per-request answers in input order; all must come from one and the same model."""
    identities = {(r.model.name, r.model.version, r.model.checkpoint_sha256) for r in responses}
    if len(identities) != 1:
        raise RewardError(
            grpc.StatusCode.ABORTED, f"parts of one call were scored by different models: {identities}"
        )
    names = list(responses[0].model.outputs)
    values = {name: np.full(count, np.nan) for name in names}
    groups: dict[str, dict[str, float]] = {}
    for part, response in zip(parts, responses, strict=True):
        if len(response.scores) != len(part):
            raise RewardError(
                grpc.StatusCode.INTERNAL,
                f"server answered {len(response.scores)} scores for {len(part)} samples",
            )
        for index, sample_scores in zip(part, response.scores, strict=True):
            missing = set(names) - set(sample_scores.values)
            if missing:
                raise RewardError(grpc.StatusCode.INTERNAL, f"server omitted outputs {sorted(missing)}")
            for name in names:
                values[name][index] = sample_scores.values[name]
        for group in response.groups:
            groups[group.group_id] = dict(group.values)
    return Scores(values=values, groups=groups, model=responses[0].model)


# -- command line ----------------------------------------------------------------------------------


def _model_json(info: reward_pb2.ModelInfo) -> dict[str, Any]:
    """Every ModelInfo field under its proto name (repeated ones as lists), so ``describe`` shows all of
    them — ``accepts_score_stream`` included — and any field added to the contract later."""
    out: dict[str, Any] = {}
    for descriptor in info.DESCRIPTOR.fields:
        value = getattr(info, descriptor.name)
        repeated = not isinstance(value, str | bytes) and hasattr(value, "__len__")
        out[descriptor.name] = list(value) if repeated else value
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.client", description="Talk to a reward service.")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--endpoint", required=True, help="HOST:PORT")
    common.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV), help=f"bearer token (default: ${TOKEN_ENV})"
    )
    common.add_argument("--tls-ca", type=Path, help="CA that signed the server certificate (enables TLS)")
    common.add_argument("--tls-cert", type=Path, help="client certificate for mTLS")
    common.add_argument("--tls-key", type=Path, help="client key for mTLS")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds")
    sub.add_parser("describe", parents=[common], help="print the model's identity and limits")
    score = sub.add_parser("score", parents=[common], help="score image files")
    score.add_argument("--image", action="append", required=True, type=Path, help="PNG or JPEG file (repeat)")
    score.add_argument("--prompt", action="append", required=True, help="one prompt, or one per image")
    score.add_argument("--metadata", help="metadata JSON object for every image (e.g. GenEval metadata)")
    score.add_argument("--group-id", default="", help="put all images in one group (for group outputs)")
    return p.parse_args(argv)


async def _run_cli(args: argparse.Namespace) -> dict[str, Any]:
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = ClientTLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    async with GrpcRewardClient(args.endpoint, token=args.token, tls=tls, timeout_s=args.timeout) as client:
        if args.command == "describe":
            return _model_json(await client.describe())
        if len(args.prompt) not in (1, len(args.image)):
            raise ValueError(
                f"give one --prompt or one per image ({len(args.image)}), got {len(args.prompt)}"
            )
        if args.metadata is not None:
            json.loads(args.metadata)  # fail here, not on the server, for a typo
        prompts = args.prompt * len(args.image) if len(args.prompt) == 1 else args.prompt
        samples = [encode_file_bytes(path.read_bytes()) for path in args.image]
        request = reward_pb2.ScoreRequest(
            samples=[
                reward_pb2.Sample(
                    image=img, prompt=prompt, metadata_json=args.metadata or "", group_id=args.group_id
                )
                for img, prompt in zip(samples, prompts, strict=True)
            ]
        )
        response = await client._call(client._stub.Score, request, _deadline(args.timeout))
        return {
            "model": _model_json(response.model),
            "scores": [
                {"image": str(path), **dict(s.values)}
                for path, s in zip(args.image, response.scores, strict=True)
            ],
            "groups": {g.group_id: dict(g.values) for g in response.groups},
        }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        result = asyncio.run(_run_cli(args))
    except RewardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
