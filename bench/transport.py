"""Transport cost per image on both paths, split into client encode, server decode and the wire, and the
score drift JPEG introduces.

Encode and decode are timed in this process with the very functions each path runs (the client's request
writer and the server's protobuf parse + image checks; the competitor's JPEG + pickle). "Wire" is what
remains of a loopback round trip against a server whose model costs nothing
(:class:`bench.scorers.NullScorer`): sockets, HTTP/2 or HTTP/1.1 framing, the server framework, response
handling. Requests carry 32 images, the server's ``max_batch_images``, so our batcher flushes at once and
no batching delay is counted as transport.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.http_pickle_baseline import HttpClient, decode_request, encode_request
from bench.load import PROMPT
from services.client import STREAM_PART_BYTES, GrpcRewardClient, encode_samples
from services.core.codec import ImageLimits, decode_image, to_chw_tensor
from services.core.scorer import ScoreBatch, Scorer
from services.core.wire import parse_request, serialize_parts, serialize_request

REQUEST_IMAGES = 32


def grpc_encode(images: np.ndarray) -> bytes:
    """What the gRPC client does per request: raw RGB8 samples written as ScoreRequest bytes."""
    return serialize_request(encode_samples(images, PROMPT, None, None))


def grpc_encode_parts(images: np.ndarray) -> list[bytes]:
    """The same bytes cut into the client's ScoreStream parts."""
    return serialize_parts(encode_samples(images, PROMPT, None, None), STREAM_PART_BYTES)


def grpc_decode(body: bytes) -> list[torch.Tensor]:
    """What the servicer does per request: parse, check and view each image as a (3, H, W) tensor."""
    request = parse_request(body)
    limits = ImageLimits()
    return [to_chw_tensor(decode_image(sample.image, limits)) for sample in request.samples]


def http_encode(images: np.ndarray) -> bytes:
    return encode_request(images, [PROMPT] * len(images))


def http_decode(body: bytes) -> list[torch.Tensor]:
    return list(decode_request(body).images)


def _per_image_ms(fn: Callable[[], Any], images: int, repeats: int) -> float:
    fn()
    best = float("inf")
    # The minimum over repeats: on a shared machine it is the least disturbed estimate of the CPU cost.
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1000.0 / images


def codec_costs(images: np.ndarray, repeats: int) -> dict[str, dict[str, float]]:
    """Client encode and server decode, ms per image, and bytes per image, for both paths."""
    out = {}
    for name, encode, decode in (("grpc", grpc_encode, grpc_decode), ("http", http_encode, http_decode)):
        body = encode(images)
        out[name] = {
            "encode_ms": _per_image_ms(lambda e=encode: e(images), len(images), repeats),
            "decode_ms": _per_image_ms(lambda d=decode, b=body: d(b), len(images), repeats),
            "bytes_per_image": len(body) / len(images),
        }
    return out


async def grpc_round_trip_ms(
    endpoint: str, images: np.ndarray, repeats: int, *, stream_part_bytes: int | None = STREAM_PART_BYTES
) -> float:
    """Median ms per image of sequential score calls of ``len(images)`` images (model cost ~0): as a
    ScoreStream of parts of ``stream_part_bytes`` (the client's default), or one Score message (None)."""
    async with GrpcRewardClient(
        endpoint, client_name="transport", stream_part_bytes=stream_part_bytes
    ) as client:
        await client.score(images, PROMPT)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            await client.score(images, PROMPT)
            times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000.0 / len(images)


def http_round_trip_ms(url: str, images: np.ndarray, repeats: int) -> float:
    client = HttpClient(url)
    try:
        client.score(images, [PROMPT] * len(images))
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            client.score(images, [PROMPT] * len(images))
            times.append(time.perf_counter() - started)
    finally:
        client.close()
    return float(np.median(times)) * 1000.0 / len(images)


def transport_table(codec: dict[str, dict[str, float]], round_trip: dict[str, float]) -> dict[str, Any]:
    """Per path, ms per image: encode, decode, wire (= round trip − encode − decode) and the total.

    The total is the measured round trip, client encode and server decode included. Encode and decode
    are timed apart, in this process; when they add up to more than the round trip (a noisy machine),
    the wire share is reported as 0 and the total stays the round trip, never their sum.
    """
    out: dict[str, Any] = {}
    for name, costs in codec.items():
        out[name] = {
            **costs,
            "round_trip_ms": round_trip[name],
            "wire_ms": max(round_trip[name] - costs["encode_ms"] - costs["decode_ms"], 0.0),
            "total_ms": round_trip[name],
        }
    out["http_over_grpc"] = out["http"]["total_ms"] / out["grpc"]["total_ms"]
    return out


def _scores(scorer: Scorer, images: list[torch.Tensor]) -> np.ndarray:
    batch = ScoreBatch(images=images, prompts=[PROMPT] * len(images), metadata=[None] * len(images))
    output = scorer.score(batch)
    return next(iter(output.samples.values())).double().numpy()


def in_process_scores(scorer: Scorer, images: np.ndarray) -> np.ndarray:
    return _scores(scorer, [torch.from_numpy(image).permute(2, 0, 1) for image in images])


def jpeg_drift(scorer: Scorer, images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How far the competitor's JPEG q75 round trip moves the scores from the lossless ones."""
    jpeg = _scores(scorer, http_decode(http_encode(images)))
    diff = np.abs(jpeg - reference)
    spread = float(reference.std())
    return {
        "mean_abs": float(diff.mean()),
        "max_abs": float(diff.max()),
        "score_std": spread,
        "mean_abs_over_std": float(diff.mean() / spread) if spread > 0 else float("nan"),
    }


def grpc_exactness(endpoint: str, images: np.ndarray, reference: np.ndarray) -> float:
    """Max |gRPC score − in-process score| for one request scored as one batch (0 means lossless)."""

    async def run() -> np.ndarray:
        async with GrpcRewardClient(endpoint, client_name="exactness") as client:
            scores = await client.score(images, PROMPT)
        return next(iter(scores.values.values()))

    return float(np.abs(asyncio.run(run()) - reference).max())
