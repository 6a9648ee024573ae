"""`python -m services.serve` and `python -m services.client` as a user runs them from a shell."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from protos import reward_pb2, reward_pb2_grpc
from services.client import GrpcRewardClient
from services.core.batcher import BatcherConfig
from services.core.codec import encode_raw
from services.server_args import config_from_args, parse_args

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def serve(*args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start `python -m services.serve ...`, wait for its `listening on` line, yield (process, endpoint)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.serve", *args, "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    try:
        line = proc.stdout.readline()
        while line.startswith("metrics on "):
            proc.metrics_endpoint = line.split("metrics on ", 1)[1].strip()
            line = proc.stdout.readline()
        assert line.startswith("listening on "), (line, proc.stderr.read() if proc.poll() is not None else "")
        yield proc, line.split("listening on ", 1)[1].strip()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.client", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_serve_and_score_from_the_shell(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    paths, expected_kb = [], []
    for i in range(2):
        array = (
            rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
            if i == 0
            else np.zeros((24, 24, 3), np.uint8)
        )
        path = tmp_path / f"img{i}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        expected_kb.append(len(buffer.getvalue()) / 1000)

    with serve("compressibility") as (_, endpoint):
        result = client(
            "score",
            "--endpoint",
            endpoint,
            "--image",
            str(paths[0]),
            "--image",
            str(paths[1]),
            "--prompt",
            "a photo",
        )
        assert result.returncode == 0, result.stderr
        payload = json.loads(result.stdout)
        assert payload["model"]["name"] == "compressibility"
        got = [s["compressibility/jpeg_kb"] for s in payload["scores"]]
        assert got == pytest.approx(expected_kb, abs=1e-9)

        described = client("describe", "--endpoint", endpoint)
        info = json.loads(described.stdout)
        assert described.returncode == 0 and info["outputs"] == ["compressibility", "compressibility/jpeg_kb"]
        # every ModelInfo field of the wire contract, the transport choice among them
        assert info["accepts_score_stream"] is True and info["max_request_bytes"] > 0
        assert {"preferred_height", "preferred_width", "requires_metadata", "group_outputs"} <= set(info)

        corrupt = tmp_path / "corrupt.png"
        corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        failed = client("score", "--endpoint", endpoint, "--image", str(corrupt), "--prompt", "x")
        assert failed.returncode == 1
        assert "INVALID_ARGUMENT" in failed.stderr and "cannot decode PNG" in failed.stderr


def queued_images(metrics_endpoint: str) -> int:
    text = urllib.request.urlopen(f"http://{metrics_endpoint}/metrics", timeout=5).read().decode()
    return int(
        sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("reward_queue_images{"))
    )


def test_sigterm_drains_accepted_requests_and_exits_zero() -> None:
    # Six requests of 8 images never fill a batch of 64, so they wait in the queue for the 4-s batching
    # delay: SIGTERM arrives while every one of them is accepted and unanswered, however fast the machine.
    num_calls, per_call, delay_s = 6, 8, 4.0
    images = np.random.default_rng(0).integers(0, 256, size=(per_call, 512, 512, 3), dtype=np.uint8)
    request = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image=encode_raw(img)) for img in images])

    async def fire(endpoint: str, proc: subprocess.Popen) -> tuple[list[grpc.StatusCode], int]:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            await stub.Describe(reward_pb2.DescribeRequest(), timeout=30)  # the connection is up

            async def one() -> grpc.StatusCode:
                try:
                    response = await stub.Score(request, timeout=60)
                except grpc.aio.AioRpcError as err:
                    return err.code()
                assert len(response.scores) == per_call
                return grpc.StatusCode.OK

            calls = [asyncio.ensure_future(one()) for _ in range(num_calls)]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + delay_s / 2
            while await asyncio.to_thread(queued_images, proc.metrics_endpoint) < num_calls * per_call:
                assert loop.time() < deadline, "the requests did not all reach the queue in time"
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            pending_at_signal = sum(not call.done() for call in calls)
            return list(await asyncio.gather(*calls)), pending_at_signal

    with serve(
        "compressibility",
        "--max-batch-images",
        str(8 * per_call),
        "--max-delay-ms",
        str(delay_s * 1000),
        "--metrics-port",
        "0",
    ) as (proc, endpoint):
        codes, pending_at_signal = asyncio.run(fire(endpoint, proc))
        assert proc.wait(60) == 0
        stderr = proc.stderr.read()
    # Every request was queued, unanswered, when SIGTERM arrived; draining still runs and answers them all.
    assert pending_at_signal == num_calls, pending_at_signal
    assert codes == [grpc.StatusCode.OK] * num_calls, (codes, stderr)
    assert "draining" in stderr


def test_serve_rejects_bad_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.serve", "compressibility", "--tls-cert", "x.crt"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 2 and "--tls-cert and --tls-key go together" in result.stderr


def test_batching_flags_reach_the_batcher_config() -> None:
    flags = ["--max-job-images", "2", "--contention-latency-slack", "0.5", "--active-window-ms", "40"]
    flags += ["--retry-grace-ms", "250"]
    batcher = config_from_args(parse_args(["compressibility", *flags])).batcher
    assert (
        batcher.max_job_images,
        batcher.contention_latency_slack,
        batcher.active_window_ms,
        batcher.retry_grace_ms,
    ) == (2, 0.5, 40, 250)
    off = config_from_args(parse_args(["compressibility", "--contention-latency-slack", "none"])).batcher
    assert off.contention_latency_slack is None
    assert config_from_args(parse_args(["compressibility"])).batcher == BatcherConfig()


@pytest.mark.slow  # each case is a fresh interpreter importing torch and the model's library
@pytest.mark.parametrize(
    ("scorer", "outputs", "group_outputs"),
    [
        ("pickscore", ["pickscore", "pickscore/raw"], []),
        ("hps", ["hps"], []),
        ("imagereward", ["imagereward"], []),
        ("dino", ["dino/mean_distance_to_group"], ["dino/diversity", "pvs"]),
    ],
)
def test_each_scorer_is_served_from_the_command_line(
    scorer: str, outputs: list[str], group_outputs: list[str]
) -> None:
    async def describe(endpoint: str):
        async with GrpcRewardClient(endpoint) as client:
            return await client.describe()

    with serve(scorer, "--tiny") as (proc, endpoint):
        info = asyncio.run(asyncio.wait_for(describe(endpoint), 60))
        assert (info.name, list(info.outputs), list(info.group_outputs)) == (scorer, outputs, group_outputs)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
