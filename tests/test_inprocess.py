"""The in-process reward client answers as the service would: same scores, same refusals."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch

from services.client import GrpcRewardClient, RewardError
from services.core.server import ServerConfig
from services.inprocess import InProcessRewardClient
from tests.conftest import MeanPixelScorer, running_server

rng = np.random.default_rng(0)
FLOAT_IMAGES = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
UINT8_HWC = [rng.integers(0, 256, (6, 10, 3), dtype=np.uint8) for _ in range(3)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def both(call) -> tuple[object, object]:
    """``call(client)`` through a served scorer and through the in-process client."""
    async with running_server(MeanPixelScorer(), ServerConfig(port=0)) as server:
        async with GrpcRewardClient(f"127.0.0.1:{server.port}") as grpc_client:
            served = await call(grpc_client)
    return served, await call(InProcessRewardClient(MeanPixelScorer()))


@pytest.mark.parametrize("images", [FLOAT_IMAGES, UINT8_HWC], ids=["float CHW batch", "uint8 HWC list"])
def test_scores_and_group_outputs_equal_the_services(images) -> None:
    groups = ["a", "b", "a", "", "b"][: len(images)]

    async def call(client):
        return await client.score(images, "p", group_ids=groups, metadata=[{"k": 1}] * len(images))

    served, local = run(both(call))
    assert served.values.keys() == local.values.keys()
    for name in served.values:
        np.testing.assert_array_equal(served.values[name], local.values[name])
    assert served.groups == local.groups and set(local.groups) == {g for g in groups if g}
    assert served.model == local.model


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"metadata": ["not json"]}, "metadata_json is not valid JSON"),
        ({"metadata": [{"reject": 1}]}, "metadata field 'reject' is not allowed"),
    ],
    ids=["bad JSON", "refused by the scorer"],
)
def test_a_call_the_service_refuses_raises_the_same_error(kwargs: dict, fragment: str) -> None:
    async def call(client):
        with pytest.raises(RewardError) as info:
            await client.score(UINT8_HWC[:1], "p", **kwargs)
        return info.value

    served, local = run(both(call))
    assert served.code == local.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in local.message and local.message == served.message
