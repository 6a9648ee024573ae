"""Bounded intake: what a request body may cost the server before it is trusted and checked.

The reader stops at the sample and field bounds (whatever the body's size), a body is not read at all
before its caller is authenticated, and streams cannot be held open without sending: idle ones are
closed, each client has a bounded number, and their buffered parts count against a byte budget.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError

from protos import reward_pb2
from services.core import servicer as servicer_module
from services.core.codec import encode_raw
from services.core.request import RequestLimits
from services.core.server import SERVICE_NAME, ServerConfig
from services.core.servicer import IntakeLimits
from services.core.wire import (
    SCORE_METHOD,
    SCORE_STREAM_METHOD,
    UNKNOWN_FIELDS_PER_BODY,
    ReadBounds,
    RequestTooLarge,
    from_message,
    parse_request,
)
from tests.conftest import MeanPixelScorer, running_server

BOUNDS = ReadBounds.for_samples(8)

# The probes' attack bodies, shrunk: what matters is that they hold far more than the bounds allow.
EMPTY_SAMPLES = b"\x0a\x00" * 100_000
UNKNOWN_VARINTS = b"\x10\x01" * 100_000
RAW_1X1 = (b"\x0a\x0b" + b"\x0a\x09\x10\x01\x18\x01\x22\x03abc") * 10_000
GROUP_OF_FIELDS = b"\x1b" + b"\x10\x01" * 100_000 + b"\x1c"  # field 3 as a group: only the library reads it
# Not canonical (the first sample's prompt twice), then many samples: left to the library, counted first.
MERGED_THEN_SAMPLES = b"\x0a\x06\x12\x01a\x12\x01b" + b"\x0a\x00" * 100_000


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (EMPTY_SAMPLES, "more than 8 samples"),
        (RAW_1X1, "more than 8 samples"),
        (UNKNOWN_VARINTS, "fields this server does not know"),
        (GROUP_OF_FIELDS, "fields this server does not know"),
        (MERGED_THEN_SAMPLES, "more than 8 samples"),
    ],
    ids=["empty samples", "1x1 raw images", "unknown fields", "a group of fields", "non-canonical"],
)
def test_the_reader_stops_at_its_bounds_without_the_library_building_the_body(
    body: bytes, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each body is valid protobuf: unbounded, the library reads it all (that is the cost refused here).
    parsed = reward_pb2.ScoreRequest.FromString(body)
    assert len(parsed.samples) > 8 or parsed.ByteSize() == len(body)  # samples, or unknown fields kept

    def library_parse(data: bytes) -> None:
        raise AssertionError("the protobuf library was asked to build a body over the bounds")

    monkeypatch.setattr(reward_pb2.ScoreRequest, "FromString", library_parse)
    with pytest.raises(RequestTooLarge, match=message):
        parse_request(body, BOUNDS)


def test_within_the_bounds_the_reader_reads_what_the_library_reads() -> None:
    sample = reward_pb2.Sample(image=encode_raw(np.full((2, 3, 3), 7, np.uint8)), prompt="p")
    unknown = b"\x50\x01" * UNKNOWN_FIELDS_PER_BODY  # a newer client's extra fields, within the allowance
    body = reward_pb2.ScoreRequest(samples=[sample] * 8).SerializeToString() + unknown
    expected = from_message(reward_pb2.ScoreRequest.FromString(body))
    assert parse_request(body, BOUNDS) == parse_request(body) == expected
    over = body + b"\x50\x01" * (2 * 8 + 1)  # past 64 per body + 2 per sample
    with pytest.raises(RequestTooLarge, match="more than 80 protobuf fields this server does not know"):
        parse_request(over, BOUNDS)
    with pytest.raises(RequestTooLarge, match="more than 8 samples"):
        parse_request(reward_pb2.ScoreRequest(samples=[sample] * 9).SerializeToString(), BOUNDS)
    # Samples already read in earlier parts of a stream count against the same limit.
    with pytest.raises(RequestTooLarge, match="more than 8 samples"):
        parse_request(body[: len(body) // 8 * 3], ReadBounds.for_samples(8, samples_before=6))
    with pytest.raises(DecodeError):
        parse_request(b"\x0a\x05\x12", BOUNDS)  # truncated: still the library's verdict


def test_an_unauthenticated_body_is_refused_without_being_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("team-a:" + "a" * 32 + "\n")
    reads: list[int] = []
    real_parse = servicer_module.parse_request

    def counting_parse(data: bytes, bounds: ReadBounds | None = None):
        reads.append(len(data))
        return real_parse(data, bounds)

    monkeypatch.setattr(servicer_module, "parse_request", counting_parse)
    body = b"\x0a\x00" * 1_000_000  # the probe's 2 MB of empty samples

    async def main() -> None:
        config = ServerConfig(port=0, token_file=token_file)
        async with running_server(MeanPixelScorer(), config) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                score = channel.unary_unary(f"/{SERVICE_NAME}/Score")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await score(body, timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert reads == []
                good = (("authorization", "Bearer " + "a" * 32),)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await score(body, metadata=good, timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "more than 512 samples" in info.value.details()
                assert reads == [len(body)]

    run(main())


def _sample_bytes(value: int) -> bytes:
    image = encode_raw(np.full((16, 16, 3), value, np.uint8))
    return reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image=image, prompt="p")]).SerializeToString()


async def _stalled_stream(
    channel: grpc.aio.Channel, name: str, first_part: bytes
) -> grpc.aio.StreamUnaryCall:
    """A ScoreStream that sends one part and then nothing (its request iterator never ends).

    A server that refuses the call on opening it may answer before or during the write; grpc then fails
    the write (InvalidStateError, or INTERNAL), and the call itself, awaited, raises the server's status."""
    call = channel.stream_unary(SCORE_STREAM_METHOD)(metadata=(("x-e2po-client", name),), timeout=30)
    try:
        await call.write(first_part)
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        if not call.done():
            raise
    return call


def test_a_stalled_stream_is_closed_after_the_idle_timeout_and_its_bytes_given_back() -> None:
    async def main() -> None:
        config = ServerConfig(port=0, intake=IntakeLimits(stream_idle_timeout_s=0.5))
        async with running_server(MeanPixelScorer(), config) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                call = await _stalled_stream(channel, "staller", _sample_bytes(3))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "stream sent no part for 0.5 s" in info.value.details()
                assert server.servicer.body_budget.used == 0
                # The server keeps serving, the same client included.
                stream = channel.stream_unary(
                    SCORE_STREAM_METHOD, response_deserializer=reward_pb2.ScoreResponse.FromString
                )
                reply = await stream(
                    [_sample_bytes(51)], metadata=(("x-e2po-client", "staller"),), timeout=10
                )
                assert reply.scores[0].values["meanpixel"] == pytest.approx(51 / 255)

    run(main())


@pytest.mark.parametrize("how", ["stalled stream", "unary body"])
def test_a_refused_body_is_freed_when_its_call_ends_not_at_some_later_collection(how: str) -> None:
    """With the garbage collector off, a refused body's memory must still come back: grpc keeps the
    exception of an aborted call in a reference cycle, and bytes never trigger a collection."""
    body = b"\x7a" + _varint(20_000_000) + bytes(20_000_000)  # one unknown 20 MB field

    async def main() -> int:
        config = ServerConfig(port=0, intake=IntakeLimits(stream_idle_timeout_s=0.3))
        async with running_server(MeanPixelScorer(), config) as server:
            options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
                before = tracemalloc.get_traced_memory()[0]
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    if how == "stalled stream":
                        await await_stalled(channel, body)
                    else:
                        await channel.unary_unary(SCORE_METHOD)(body, timeout=10)
                assert info.value.code() in (
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.INVALID_ARGUMENT,
                )
                await asyncio.sleep(0.2)
                return tracemalloc.get_traced_memory()[0] - before

    async def await_stalled(channel: grpc.aio.Channel, part: bytes) -> None:
        call = channel.stream_unary(SCORE_STREAM_METHOD)(timeout=10)
        await call.write(part)
        await call

    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        grown = run(main())
    finally:
        tracemalloc.stop()
        gc.enable()
    assert grown < 5_000_000, f"{grown / 1e6:.0f} MB of Python objects left after the call"


def test_streams_per_client_are_bounded_and_other_clients_are_not() -> None:
    async def main() -> None:
        config = ServerConfig(port=0, intake=IntakeLimits(max_streams_per_client=2))
        async with running_server(MeanPixelScorer(), config) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                held = [await _stalled_stream(channel, "greedy", _sample_bytes(1)) for _ in range(2)]
                await asyncio.sleep(0.2)  # both are being read by the server
                for _ in range(3):  # a refusal must not free a slot, or each would let one more in
                    refused = await _stalled_stream(channel, "greedy", _sample_bytes(1))
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await refused
                    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "already has 2 ScoreStream calls open" in info.value.details()
                    assert dict(info.value.trailing_metadata())["retry-after-ms"] == "1000"
                    await asyncio.sleep(0.1)  # the refused call's handler has finished
                    assert list(server.servicer._open_streams.values()) == [2]
                stream = channel.stream_unary(
                    SCORE_STREAM_METHOD, response_deserializer=reward_pb2.ScoreResponse.FromString
                )
                other = await stream([_sample_bytes(9)], metadata=(("x-e2po-client", "other"),), timeout=10)
                assert other.scores[0].values["meanpixel"] == pytest.approx(9 / 255)
                for call in held:  # ending the held streams frees the client's slots
                    await call.done_writing()
                    await call
                again = await stream([_sample_bytes(9)], metadata=(("x-e2po-client", "greedy"),), timeout=10)
                assert len(again.scores) == 1
                assert server.servicer._open_streams == {}

    run(main())


def test_buffered_stream_parts_count_against_the_byte_budget() -> None:
    part = _sample_bytes(5)  # 787 bytes

    async def main() -> None:
        config = ServerConfig(
            port=0,
            limits=RequestLimits(max_request_bytes=1200),
            intake=IntakeLimits(max_buffered_request_bytes=2 * len(part) + 100),
        )
        async with running_server(MeanPixelScorer(), config) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                first = await _stalled_stream(channel, "a", part)
                second = await _stalled_stream(channel, "b", part)
                await asyncio.sleep(0.2)
                assert server.servicer.body_budget.used == 2 * len(part)
                third = await _stalled_stream(channel, "c", part)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await third
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "request bytes held" in info.value.details()
                first.cancel()
                await second.done_writing()
                assert len((reward_pb2.ScoreResponse.FromString(await second)).scores) == 1
                await asyncio.sleep(0.2)
                assert server.servicer.body_budget.used == 0

    run(main())
