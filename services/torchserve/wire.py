"""The TorchServe adapter's wire: ScoreRequest bytes in; ScoreResponse bytes or an error reply out.

The checks, limits and error sentences are the gRPC servicer's: both decode and answer requests with
``services.core.request``, images through the same codec with the same ``ImageLimits``, and the
scorer's own ``validate``. ``tests/test_torchserve.py`` sends the same malformed
requests to both paths and requires the same sentences, so the two cannot drift apart silently.

Errors: TorchServe 0.12 keeps a per-request status only on its REST API; over gRPC a batched reply
is always OK and only a whole-batch failure becomes a gRPC status. So one bad request must not fail
its batch, and its reply says so itself: ``e2po-error <http code> <sentence>``. No ScoreResponse can
start with those bytes (its first byte is the tag of field 1, 2 or 3), so the two never mix up.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from protos import reward_pb2
from services.core import wire
from services.core.request import RequestError, RequestLimits, check_sample_count
from services.core.wire import WireRequest

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


def parse_request(data: bytes | bytearray, limits: RequestLimits) -> WireRequest:
    """Parse and size-check serialized ScoreRequest bytes; raise RequestError."""
    if len(data) > limits.max_request_bytes:
        raise RequestError(f"request has {len(data)} bytes, limit is {limits.max_request_bytes}")
    try:
        request = wire.parse_request(bytes(data), wire.ReadBounds.for_samples(limits.max_images_per_request))
    except DecodeError as exc:
        raise RequestError(f"request is not a valid message: {exc}") from None
    except wire.RequestTooLarge as exc:
        raise RequestError(str(exc)) from None
    check_sample_count(request, limits)
    return request
