"""ScoreStream: one request sent as a stream of parts, on a real server over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import grpc
import numpy as np
import pytest

from protos import reward_pb2
from services.client import GrpcRewardClient
from services.core.codec import encode_raw
from services.core.request import RequestLimits
from services.core.server import SERVICE_NAME, ServerConfig
from services.core.wire import SCORE_STREAM_METHOD, encode_sample, serialize_parts, serialize_request
from tests.conftest import MeanPixelScorer, running_server, solid_images


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def sample(value: int, size: int = 4, **kw) -> reward_pb2.Sample:
    image = encode_raw(np.full((size, size, 3), value, np.uint8))
    return reward_pb2.Sample(image=image, prompt=f"p{value}", **kw)


def request_bytes(samples: Iterable[reward_pb2.Sample]) -> bytes:
    return reward_pb2.ScoreRequest(samples=list(samples)).SerializeToString()


CLIENT = (("x-e2po-client", "stream-test"),)


def test_serialized_parts_concatenate_to_the_whole_request() -> None:
    rng = np.random.default_rng(0)
    samples = [
        encode_sample(rng.integers(0, 256, (h, h, 3), dtype=np.uint8), f"p{i}", "", f"g{i % 2}")
        for i, h in enumerate([4, 8, 16, 4, 8, 2])
    ]
    whole = serialize_request(samples)
    for limit in (1, 100, 300, 800, 10_000):
        parts = serialize_parts(samples, limit)
        assert b"".join(parts) == whole
        # Each part is a message of whole samples, at most the limit unless one sample alone exceeds it.
        sizes = [reward_pb2.ScoreRequest.FromString(part).ByteSize() for part in parts]
        assert all(
            size <= limit or len(reward_pb2.ScoreRequest.FromString(p).samples) == 1
            for size, p in zip(sizes, parts, strict=True)
        )
        assert sum(len(reward_pb2.ScoreRequest.FromString(p).samples) for p in parts) == len(samples)
    assert len(serialize_parts(samples, 1)) == len(samples)
    assert serialize_parts(samples, None) == [whole]
    # Protobuf's own reading of the concatenation: the parts' repeated samples append, in order.
    merged = reward_pb2.ScoreRequest()
    for part in serialize_parts(samples, 300):
        merged.MergeFromString(part)
    assert merged == reward_pb2.ScoreRequest.FromString(whole)


def test_a_streamed_request_is_answered_as_the_same_request_sent_whole() -> None:
    values = [10, 20, 30, 40, 50, 60, 70]
    groups = ["g", "h", "g", "", "h", "g", "k"]
    samples = [sample(v, group_id=g) for v, g in zip(values, groups, strict=True)]
    parts = [samples[0:3], samples[3:4], samples[4:7]]  # groups g and h span parts

    async def main() -> None:
        async with running_server(MeanPixelScorer()) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stream = channel.stream_unary(
                    SCORE_STREAM_METHOD, response_deserializer=reward_pb2.ScoreResponse.FromString
                )
                whole = channel.unary_unary(
                    f"/{SERVICE_NAME}/Score", response_deserializer=reward_pb2.ScoreResponse.FromString
                )
                streamed = await stream([request_bytes(p) for p in parts], metadata=CLIENT, timeout=10)
                sent_whole = await whole(request_bytes(samples), metadata=CLIENT, timeout=10)
        assert streamed == sent_whole
        got = [s.values["meanpixel"] for s in streamed.scores]
        np.testing.assert_allclose(got, np.array(values) / 255, atol=1e-12)
        group_means = {g.group_id: g.values["meanpixel/group_mean"] for g in streamed.groups}
        assert group_means["g"] == pytest.approx(np.mean([10, 30, 60]) / 255)
        assert group_means["h"] == pytest.approx(np.mean([20, 50]) / 255)

    run(main())


def test_streamed_requests_over_the_limits_are_refused_and_the_server_keeps_serving() -> None:
    big = [sample(v, size=16) for v in (1, 2, 3)]  # ~790 bytes each: 3 parts of one pass 2,000 bytes
    cases = {
        "no parts": ([], "no samples"),
        "only empty parts": ([b"", b""], "no samples"),
        "more parts than samples allowed": ([b""] * 9, "more than 8 parts"),
        "too many images over the parts": (
            [request_bytes(sample(v) for v in range(i, i + 3)) for i in (0, 3, 6)],
            "more than 8 samples",
        ),
        "too many bytes over the parts": ([request_bytes([s]) for s in big], "more than 2000 bytes"),
        "a malformed part": ([request_bytes([sample(5)]), b"\x0a\xff\xff\xff"], "not a valid message"),
        "a bad image in a later part": (
            [request_bytes([sample(5)]), request_bytes([reward_pb2.Sample(prompt="x")])],
            "sample 1: no image",
        ),
    }

    async def main() -> None:
        limits = RequestLimits(max_images_per_request=8, max_request_bytes=2000)
        scorer = MeanPixelScorer()
        async with running_server(scorer, ServerConfig(port=0, limits=limits)) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stream = channel.stream_unary(
                    SCORE_STREAM_METHOD, response_deserializer=reward_pb2.ScoreResponse.FromString
                )
                for name, (parts, message) in cases.items():
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stream(parts, metadata=CLIENT, timeout=10)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
                    assert message in info.value.details(), (name, info.value.details())
                    ok = await stream([request_bytes([sample(51)])] * 2, metadata=CLIENT, timeout=10)
                    assert [s.values["meanpixel"] for s in ok.scores] == pytest.approx([0.2, 0.2])
        assert scorer.seen_prompts() == ["p51"] * 2 * len(cases)  # no bad request reached the model

    run(main())


def _caller(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    return tuple((m.key, m.value) for m in context.invocation_metadata() or () if m.key.startswith("x-"))


@asynccontextmanager
async def forwarding_server(target: str, methods: tuple[str, ...]) -> AsyncIterator[tuple[int, list[str]]]:
    """A RewardService that passes the bytes of ``methods`` on to ``target`` and records each call. When
    ``methods`` leaves ScoreStream out it is a server from before it: no such method, and a Describe
    answer without ``accepts_score_stream``."""
    calls: list[str] = []
    channel = grpc.aio.insecure_channel(target)
    streams = "ScoreStream" in methods

    def unary(name: str):
        upstream = channel.unary_unary(f"/{SERVICE_NAME}/{name}")

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            calls.append(name)
            answer = await upstream(request, metadata=_caller(context))
            if name == "Describe" and not streams:
                info = reward_pb2.ModelInfo.FromString(answer)
                info.ClearField("accepts_score_stream")
                answer = info.SerializeToString()
            return answer

        return grpc.unary_unary_rpc_method_handler(handle)

    def streamed(name: str):
        upstream = channel.stream_unary(f"/{SERVICE_NAME}/{name}")

        async def handle(parts: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            received = [part async for part in parts]
            calls.append(f"{name}:{len(received)}")
            return await upstream(received, metadata=_caller(context))

        return grpc.stream_unary_rpc_method_handler(handle)

    handlers = {name: (streamed if name == "ScoreStream" else unary)(name) for name in methods}
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, calls
    finally:
        await server.stop(0)
        await channel.close()


def test_the_client_streams_large_requests_and_sends_score_to_an_older_server() -> None:
    values = list(range(0, 250, 25))  # 10 images of 8×8: ~220 bytes each on the wire
    expected = np.array(values) / 255

    async def main() -> None:
        async with running_server(MeanPixelScorer()) as real:
            target = f"127.0.0.1:{real.port}"
            async with forwarding_server(target, ("Describe", "Score", "ScoreStream")) as (port, calls):
                async with GrpcRewardClient(f"127.0.0.1:{port}", stream_part_bytes=500) as client:
                    large = await client.score(solid_images(values), "p")
                    small = await client.score(solid_images(values[:1]), "p")
                np.testing.assert_allclose(large.values["meanpixel"], expected, atol=1e-12)
                assert small.values["meanpixel"].tolist() == pytest.approx(expected[:1].tolist())
                assert calls == ["Describe", "ScoreStream:5", "Score"]  # parts of 2 images; 1 image whole
            async with forwarding_server(target, ("Describe", "Score")) as (port, calls):
                async with GrpcRewardClient(f"127.0.0.1:{port}", stream_part_bytes=500) as client:
                    for _ in range(2):
                        scores = await client.score(solid_images(values), "p")
                        np.testing.assert_allclose(scores.values["meanpixel"], expected, atol=1e-12)
                assert calls == ["Describe", "Score", "Score"]

    run(main())
