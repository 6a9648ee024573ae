"""The TorchServe adapter's wire: ScoreRequest bytes in; ScoreResponse bytes or an error reply out.

The checks, limits and error sentences are the gRPC servicer's (``services.core.servicer``): images go
through the same codec with the same ``ImageLimits``, prompts/metadata/group ids through the same
limits, and the scorer's own ``validate``. ``tests/test_torchserve.py`` sends the same malformed
requests to both paths and requires the same sentences, so the two cannot drift apart silently.

Errors: TorchServe 0.12 keeps a per-request status only on its REST API; over gRPC a batched reply
is always OK and only a whole-batch failure becomes a gRPC status. So one bad request must not fail
its batch, and its reply says so itself: ``e2po-error <http code> <sentence>``. No ScoreResponse can
start with those bytes (its first byte is the tag of field 1, 2 or 3), so the two never mix up.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from google.protobuf.message import DecodeError

from protos import reward_pb2
from services.core.codec import ImageError, Reserve, decode_image, to_chw_tensor
from services.core.runner import JobResult
from services.core.scorer import ScoreBatch, Scorer
from services.core.servicer import RequestError, RequestLimits, model_info

ERROR_PREFIX = b"e2po-error "


class ReplyError(Exception):
    """A request the adapter refused or failed; ``code`` is the HTTP status TorchServe's REST API used."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def error_reply(code: int, message: str) -> bytes:
    return ERROR_PREFIX + f"{code} {message}".encode()


def read_reply(data: bytes) -> reward_pb2.ScoreResponse:
    """A handler reply → ScoreResponse, or raise ReplyError for an error reply."""
    if data.startswith(ERROR_PREFIX):
        code, _, message = data[len(ERROR_PREFIX) :].decode(errors="replace").partition(" ")
        raise ReplyError(int(code), message)
    return reward_pb2.ScoreResponse.FromString(data)


def parse_request(data: bytes | bytearray, limits: RequestLimits) -> reward_pb2.ScoreRequest:
    """Parse and size-check serialized ScoreRequest bytes; raise RequestError."""
    if len(data) > limits.max_request_bytes:
        raise RequestError(f"request has {len(data)} bytes, limit is {limits.max_request_bytes}")
    try:
        request = reward_pb2.ScoreRequest.FromString(bytes(data))
    except DecodeError as exc:
        raise RequestError(f"request is not a valid message: {exc}") from None
    count = len(request.samples)
    if count == 0:
        raise RequestError("request has no samples")
    if count > limits.max_images_per_request:
        raise RequestError(f"request has {count} samples, limit is {limits.max_images_per_request}; split it")
    return request


def decode_request(
    request: reward_pb2.ScoreRequest, scorer: Scorer, limits: RequestLimits, reserve: Reserve
) -> ScoreBatch:
    """Decode and validate every sample; raise RequestError naming the first bad one.

    ``reserve`` is the request's pixel reservation (``budget.Reservation.take``), called before each
    image is allocated.
    """
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


def encode_response(
    parts: list[tuple[list[int], JobResult]], num_samples: int, scorer: Scorer, limits: RequestLimits
) -> reward_pb2.ScoreResponse:
    """Assemble one request's response from its jobs' results (request indices, result)."""
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
