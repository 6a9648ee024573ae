"""The trainer against reward services that go away: it waits and continues, or fails clearly."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from services.core.server import RewardServer, ServerConfig
from tests.conftest import MeanPixelScorer
from tests.test_trainer_e2e import tiny_config
from tests.tiny_sd3 import tiny_model
from trainer.loop import Trainer
from trainer.rewards import RewardSet, RewardSpec, RewardUnavailable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_server(port: int) -> RewardServer:
    server = RewardServer(lambda: MeanPixelScorer(), "meanpixel", ServerConfig(port=port, drain_grace_s=0))
    await server.start()
    return server


def test_reward_outage_mid_run_is_waited_out_and_no_sample_is_lost_or_doubled(tmp_path: Path) -> None:
    port = free_port()
    run_dir = tmp_path / "run"
    cfg = tiny_config(tmp_path, iterations=3)
    cfg.reward.rewards = [RewardSpec(name="meanpixel", endpoint=f"127.0.0.1:{port}")]
    cfg.reward.timeout_s = 60

    async def main() -> None:
        server = await start_server(port)
        rewards = RewardSet(cfg.reward)
        await rewards.connect()
        trainer = Trainer(cfg, tiny_model(), rewards, run_dir)
        training = asyncio.ensure_future(trainer.train())
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            await asyncio.sleep(0.05)
        await server.drain()  # the service disappears (grace 0: in-flight calls are cut)
        await asyncio.sleep(1.5)
        server = await start_server(port)  # ...and comes back on the same address
        try:
            await training
        finally:
            await rewards.close()
            await server.drain()

    asyncio.run(asyncio.wait_for(main(), 240))
    rows = [json.loads(line) for line in (run_dir / "rewards.jsonl").read_text().splitlines()]
    per_iteration = {}
    for row in rows:
        per_iteration.setdefault(row["iteration"], []).append(row["sample"])
    assert sorted(per_iteration) == [1, 2, 3]
    for samples in per_iteration.values():
        assert sorted(samples) == list(range(12))  # each sample exactly once, none missing


def test_reward_service_that_never_returns_fails_the_run_clearly(tmp_path: Path) -> None:
    port = free_port()
    cfg = tiny_config(tmp_path, iterations=2)
    cfg.reward.rewards = [RewardSpec(name="meanpixel", endpoint=f"127.0.0.1:{port}")]
    cfg.reward.timeout_s = 2.0

    async def main() -> None:
        server = await start_server(port)
        rewards = RewardSet(cfg.reward)
        await rewards.connect()
        await server.drain()  # gone for good after the run started
        trainer = Trainer(cfg, tiny_model(), rewards, tmp_path / "run")
        try:
            await trainer.train()
        finally:
            await rewards.close()

    with pytest.raises(RewardUnavailable, match=r"meanpixel.*(DEADLINE_EXCEEDED|UNAVAILABLE)"):
        asyncio.run(asyncio.wait_for(main(), 120))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing was trained on invented rewards
