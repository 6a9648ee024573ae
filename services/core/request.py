"""One ScoreRequest's checks, decoding and answer, shared by every transport (gRPC, TorchServe).

Both paths go through these functions with the same ``RequestLimits``, so their limits and error
sentences cannot drift apart (``tests/test_torchserve.py`` sends the same malformed requests to both).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protos import reward_pb2
from services.core.codec import ImageError, ImageLimits, Reserve, decode_image, to_chw_tensor
from services.core.runner import JobResult
from services.core.scorer import ModelIdentity, ScoreBatch, Scorer
from services.core.wire import WireRequest

MIN_REQUEST_BYTES = 1024
"""Smallest accepted ``max_request_bytes``: below it not even a 16x16 raw image fits a request."""


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """Per-request limits, checked before any work is queued."""

    max_images_per_request: int = 512
    """More images must be split by the client (the bundled client does this itself)."""
    max_request_bytes: int = 64 * 1024 * 1024
    """Largest request: gRPC's max receive message size, and the bound on a ScoreStream's parts
    together; the client keeps its chunks well under it."""
    max_prompt_chars: int = 4096
    """Longest prompt a sample may carry, in characters."""
    max_metadata_chars: int = 65536
    """Longest metadata JSON a sample may carry (GenEval's include lists), in characters."""
    max_group_id_chars: int = 256
    """Longest group id, in characters."""
    max_pixels_per_request: int = 32 * 1024 * 1024
    """Decoded pixels of one request (≈100 MB as uint8 RGB). More than a raw request under
    ``max_request_bytes`` can carry, so it only bites on PNG/JPEG that expand far beyond their size."""
    image: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        for name, least in (
            ("max_images_per_request", 1),
            ("max_request_bytes", MIN_REQUEST_BYTES),
            ("max_prompt_chars", 0),
            ("max_metadata_chars", 0),
            ("max_group_id_chars", 0),
            ("max_pixels_per_request", 1),
        ):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if self.max_pixels_per_request < self.image.max_pixels:
            raise ValueError(
                f"max_pixels_per_request ({self.max_pixels_per_request}) must be >= the per-image "
                f"max_pixels ({self.image.max_pixels}), or the largest image could never be scored"
            )


class RequestError(ValueError):
    """The request is malformed; answered INVALID_ARGUMENT with this message."""


def check_sample_count(request: WireRequest, limits: RequestLimits) -> None:
    count = len(request.samples)
    if count == 0:
        raise RequestError("request has no samples")
    if count > limits.max_images_per_request:
        raise RequestError(f"request has {count} samples, limit is {limits.max_images_per_request}; split it")


def decode_samples(
    request: WireRequest, scorer: Scorer, limits: RequestLimits, reserve: Reserve
) -> ScoreBatch:
    """Decode and validate every sample; raise RequestError naming the first bad one.

    ``reserve`` is the request's pixel reservation (``budget.Reservation.take``), called before each
    image is allocated.
    """
    identity = scorer.identity
    images, prompts, metadata, group_ids = [], [], [], []
    for index, sample in enumerate(request.samples):
        where = f"sample {index}"
        if sample.image is None:
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
        meta = parse_metadata(sample.metadata_json, limits.max_metadata_chars, where)
        if meta is None and identity.requires_metadata:
            raise RequestError(f"{where}: model {identity.name!r} requires metadata_json")
        try:
            scorer.validate(sample.prompt, meta)
        except ValueError as exc:
            raise RequestError(f"{where}: {exc}") from None
        prompts.append(sample.prompt)
        metadata.append(meta)
        group_ids.append(sample.group_id)
    return ScoreBatch(images=images, prompts=prompts, metadata=metadata, group_ids=group_ids)


def parse_metadata(text: str, max_chars: int, where: str) -> Mapping[str, Any] | None:
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


def score_response(
    parts: Sequence[tuple[Sequence[int], JobResult]], num_samples: int, scorer: Scorer, limits: RequestLimits
) -> reward_pb2.ScoreResponse:
    """One request's answer from its jobs' results: (request indices, result) per job."""
    per_sample: list[dict[str, float]] = [{} for _ in range(num_samples)]
    response = reward_pb2.ScoreResponse(model=model_info(scorer.identity, limits))
    for indices, result in parts:
        for position, index in enumerate(indices):
            per_sample[index] = {name: float(values[position]) for name, values in result.samples.items()}
        for gid, values in result.groups.items():
            response.groups.add(group_id=gid, values=values)
    for values in per_sample:
        response.scores.add().values.update(values)
    return response
