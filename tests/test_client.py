"""The async reward client: chunking, ordering, retries, and never inventing a score."""

from __future__ import annotations

import asyncio
import socket

import grpc
import numpy as np
import pytest

from protos import reward_pb2
from services.client import GrpcRewardClient, RetryPolicy, RewardError, _merge
from services.core.request import RequestLimits
from services.core.server import RewardServer, ServerConfig
from tests.conftest import MeanPixelScorer, running_server, solid_images


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_big_batches_are_chunked_under_the_limits_keeping_groups_whole() -> None:
    values = list(range(0, 250, 10))  # 25 images
    groups = [f"g{i // 3}" for i in range(25)]  # groups of 3, the last of 1

    async def main() -> None:
        config = ServerConfig(port=0, limits=RequestLimits(max_images_per_request=4))
        scorer = MeanPixelScorer()
        async with running_server(scorer, config) as server:
            # 8×8 raw images are ~200 bytes on the wire; 700 bytes per chunk forces byte-based splits too.
            async with GrpcRewardClient(f"127.0.0.1:{server.port}", max_chunk_bytes=700) as client:
                scores = await client.score(
                    solid_images(values), [f"p{i}" for i in range(25)], group_ids=groups
                )
        np.testing.assert_allclose(scores.values["meanpixel"], np.array(values) / 255, atol=1e-12)
        for g in set(groups):
            members = [v for v, gg in zip(values, groups, strict=True) if gg == g]
            assert scores.groups[g]["meanpixel/group_mean"] == pytest.approx(np.mean(members) / 255)
        assert sorted(scorer.seen_prompts()) == sorted(f"p{i}" for i in range(25))  # each scored exactly once

    run(main())


def test_float_tensors_are_quantised_before_sending() -> None:
    import torch

    async def main() -> None:
        async with running_server(MeanPixelScorer()) as server:
            async with GrpcRewardClient(f"127.0.0.1:{server.port}") as client:
                batch = torch.full((2, 3, 4, 4), 0.5)  # BCHW float in [0, 1]
                scores = await client.score(batch, "p")
        assert scores.values["meanpixel"].tolist() == pytest.approx([128 / 255] * 2)

    run(main())


def test_client_retries_until_the_server_is_up() -> None:
    port = free_port()

    async def main() -> None:
        async with GrpcRewardClient(f"127.0.0.1:{port}", retry=RetryPolicy(initial_backoff_s=0.05)) as client:
            call = asyncio.ensure_future(client.score(solid_images([51]), "p", timeout_s=30))
            await asyncio.sleep(0.5)
            assert not call.done()
            server = RewardServer(lambda: MeanPixelScorer(), "meanpixel", ServerConfig(port=port))
            await server.start()
            try:
                scores = await call
            finally:
                await server.drain()
        assert scores.values["meanpixel"].tolist() == pytest.approx([0.2])

    run(main())


def test_no_score_is_ever_invented_when_the_server_stays_down() -> None:
    port = free_port()

    async def main() -> None:
        policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
        async with GrpcRewardClient(f"127.0.0.1:{port}", retry=policy) as client:
            with pytest.raises(RewardError) as info:
                await client.score(solid_images([1, 2]), "p", timeout_s=5)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE

        async with GrpcRewardClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(RewardError) as info:
                await client.score(solid_images([1, 2]), "p", timeout_s=0.5)
        assert info.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)

    run(main())


def test_non_retryable_errors_fail_at_once() -> None:
    async def main() -> None:
        scorer = MeanPixelScorer()
        async with running_server(scorer) as server:
            async with GrpcRewardClient(f"127.0.0.1:{server.port}") as client:
                with pytest.raises(RewardError) as info:
                    await client.score(solid_images([1]), "p", metadata=[{"reject": True}])
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "'reject' is not allowed" in info.value.message
        assert scorer.seen_prompts() == []

    run(main())


def test_mismatched_inputs_are_refused_locally() -> None:
    async def main() -> None:
        async with GrpcRewardClient("127.0.0.1:1") as client:
            with pytest.raises(ValueError, match="prompts has 1 entries for 2 images"):
                await client.score(solid_images([1, 2]), ["only one"])
            with pytest.raises(ValueError, match="not a single 3-D image"):
                await client.score(solid_images([1])[0], "p")

    run(main())


def test_parts_scored_by_different_models_are_refused() -> None:
    def response(sha: str) -> reward_pb2.ScoreResponse:
        info = reward_pb2.ModelInfo(name="m", version="1", checkpoint_sha256=sha, outputs=["m"])
        return reward_pb2.ScoreResponse(scores=[reward_pb2.SampleScores(values={"m": 1.0})], model=info)

    with pytest.raises(RewardError, match="different models"):
        _merge([[0], [1]], [response("aaa"), response("bbb")], 2)
    merged = _merge([[1], [0]], [response("aaa"), response("aaa")], 2)
    assert merged.values["m"].tolist() == [1.0, 1.0]


def test_a_missing_output_is_an_error_not_a_nan() -> None:
    info = reward_pb2.ModelInfo(name="m", outputs=["m", "m/raw"])
    bad = reward_pb2.ScoreResponse(scores=[reward_pb2.SampleScores(values={"m": 1.0})], model=info)
    with pytest.raises(RewardError, match="omitted outputs"):
        _merge([[0]], [bad], 1)
