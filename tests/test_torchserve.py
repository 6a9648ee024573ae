"""The TorchServe adapter: same decoding, limits and scores as the gRPC server, and a real TorchServe.

The in-process tests drive the handler with a stand-in for TorchServe's context; the last test builds a
real archive, starts TorchServe (Java) on loopback ports and scores through its gRPC inference API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import reward_pb2, reward_pb2_grpc
from services.compressibility import CompressibilityScorer
from services.core.codec import ImageLimits, encode_raw, to_chw_tensor
from services.core.request import RequestLimits
from services.core.scorer import ScoreBatch
from services.core.server import ServerConfig
from services.torchserve.__main__ import main as torchserve_cli
from services.torchserve.config import ServerSettings, render_properties
from services.torchserve.handler import RewardHandler
from services.torchserve.spec import ArchiveSpec
from services.torchserve.wire import ReplyError, read_reply
from tests.conftest import MeanPixelScorer, running_server
from tests.test_codec import png_bomb


@dataclass
class FakeContext:
    """The part of TorchServe's ``Context`` the handler uses."""

    system_properties: dict = field(default_factory=dict)
    statuses: dict[int, tuple[int, str]] = field(default_factory=dict)
    content_types: dict[int, str] = field(default_factory=dict)

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value


def sample(value: int = 10, size: int = 4, **kw) -> reward_pb2.Sample:
    return reward_pb2.Sample(image=encode_raw(np.full((size, size, 3), value, np.uint8)), **kw)


def handler_for(scorer, **spec) -> RewardHandler:
    handler = RewardHandler()
    handler.attach(scorer, ArchiveSpec(scorer="meanpixel", **spec))
    return handler


def handle(handler: RewardHandler, *requests: reward_pb2.ScoreRequest) -> tuple[list[bytes], FakeContext]:
    return handle_bytes(handler, *(r.SerializeToString() for r in requests))


def handle_bytes(handler: RewardHandler, *bodies: bytes) -> tuple[list[bytes], FakeContext]:
    context = FakeContext()
    return handler.handle([{"score_request": body} for body in bodies], context), context


def test_bad_requests_get_the_grpc_servers_sentences() -> None:
    def png(data: bytes) -> reward_pb2.Image:
        return reward_pb2.Image(encoding=reward_pb2.IMAGE_ENCODING_PNG, data=data)

    cases = {
        "wrong byte length": [reward_pb2.Sample(image=reward_pb2.Image(height=4, width=4, data=b"\0" * 47))],
        "zero size": [reward_pb2.Sample(image=reward_pb2.Image(height=0, width=4))],
        "too many pixels": [
            reward_pb2.Sample(image=reward_pb2.Image(height=300, width=300, data=b"\0" * 270000))
        ],
        "corrupt png": [reward_pb2.Sample(image=png(b"\x89PNG\r\n\x1a\n\x00\x00garbage"))],
        "png bomb": [reward_pb2.Sample(image=png(png_bomb(6400, 6400)))],
        "metadata not json": [sample(metadata_json="{not json")],
        "metadata not an object": [sample(metadata_json="[1, 2]")],
        "metadata rejected by scorer": [sample(metadata_json='{"reject": 1}')],
        "prompt too long": [sample(prompt="x" * 5000)],
        "group id too long": [sample(group_id="g" * 300)],
        "empty batch": [],
        "too many images": [sample() for _ in range(9)],
        "missing image": [reward_pb2.Sample(prompt="x")],
        "too many pixels in the request": [sample(size=200), sample(size=200)],
    }
    limits = RequestLimits(
        max_images_per_request=8, max_pixels_per_request=65536, image=ImageLimits(max_pixels=65536)
    )
    handler = handler_for(
        MeanPixelScorer(), max_images_per_request=8, max_pixels=65536, max_pixels_per_request=65536
    )
    garbage = b"\x0a\x05\x0a\x03"  # a sample field whose length runs past the end of the body

    async def grpc_details() -> dict[str, str]:
        details = {}
        async with running_server(MeanPixelScorer(), ServerConfig(port=0, limits=limits)) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                for name, samples in cases.items():
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.Score(reward_pb2.ScoreRequest(samples=samples), timeout=10)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
                    details[name] = info.value.details()
                raw_score = channel.unary_unary(
                    "/e2po.reward.v1.RewardService/Score",
                    request_serializer=bytes,
                    response_deserializer=reward_pb2.ScoreResponse.FromString,
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await raw_score(garbage, timeout=10)
                details["not a message"] = info.value.details()
        return details

    expected = asyncio.run(asyncio.wait_for(grpc_details(), 60))
    for name, samples in cases.items():
        (reply,), context = handle(handler, reward_pb2.ScoreRequest(samples=samples))
        with pytest.raises(ReplyError) as info:
            read_reply(reply)
        assert (info.value.code, info.value.message) == (400, expected[name]), name
        assert context.statuses[0] == (400, "Bad Request"), (
            name
        )  # HTTP's ASCII phrase; the sentence is the body
    (reply,), _ = handle_bytes(handler, garbage)
    with pytest.raises(ReplyError) as info:
        read_reply(reply)
    assert info.value.message == expected["not a message"]


def test_a_batch_of_requests_scores_like_the_grpc_server_and_one_bad_request_fails_alone() -> None:
    values = [[10, 20, 30, 40, 50], [], [60, 70, 80]]
    groups = [["g", "h", "g", "", "g"], [], ["g", "", "g"]]
    requests = [
        reward_pb2.ScoreRequest(
            samples=[sample(v, prompt=f"p{v}", group_id=g) for v, g in zip(vs, gs, strict=True)]
        )
        for vs, gs in zip(values, groups, strict=True)
    ]
    requests[1] = reward_pb2.ScoreRequest(samples=[sample(metadata_json='{"reject": true}')])
    scorer = MeanPixelScorer()
    handler = handler_for(scorer, max_batch_images=2)

    replies, context = handle(handler, *requests)

    async def grpc_responses() -> list[reward_pb2.ScoreResponse]:
        async with running_server(MeanPixelScorer()) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                return [await stub.Score(requests[i], timeout=10) for i in (0, 2)]

    expected = asyncio.run(asyncio.wait_for(grpc_responses(), 60))
    for position, want in zip((0, 2), expected, strict=True):
        got = read_reply(replies[position])
        got.ClearField("groups")
        want_groups = {g.group_id: dict(g.values) for g in want.groups}
        assert {g.group_id: dict(g.values) for g in read_reply(replies[position]).groups} == want_groups
        want.ClearField("groups")
        assert got == want  # per-sample values, their order and the model identity
        assert context.content_types[position] == "application/x-protobuf"
    with pytest.raises(ReplyError, match="'reject' is not allowed"):
        read_reply(replies[1])
    # Jobs (whole groups) fill model calls of <= max_batch_images; group g of request 0 (3) runs alone.
    assert [len(batch) for batch in scorer.batches] == [3, 2, 2, 1]


def test_config_is_loopback_token_protected_and_batches_per_model(tmp_path: Path) -> None:
    specs = [ArchiveSpec(scorer="compressibility", batch_requests=4, max_delay_ms=12.0)]
    text = render_properties(tmp_path, specs, ServerSettings())
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    for key in ("inference_address", "management_address", "metrics_address"):
        assert "//127.0.0.1:" in props[key], key
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["enable_model_api"] == "false"
    assert props["disable_token_authorization"] == "false"
    model = json.loads(props["models"])["compressibility"]["1.0"]
    assert (model["batchSize"], model["maxBatchDelay"]) == (4, 12)
    # A public host opens inference and metrics only; management stays on loopback.
    public = dict(
        line.split("=", 1)
        for line in render_properties(tmp_path, specs, ServerSettings(host="0.0.0.0")).splitlines()
        if "=" in line
    )
    assert public["inference_address"].startswith("http://0.0.0.0:")
    assert public["management_address"].startswith("http://127.0.0.1:")


def test_build_refuses_grpc_transport_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = torchserve_cli(["build", "compressibility", "--port", "1234", "--out", str(tmp_path)])
    assert code == 2
    assert "--port" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# -- a real TorchServe ------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class RunningTorchServe:
    grpc_port: int
    rest_port: int
    key: str
    log: Path


@pytest.fixture
def torchserve(tmp_path: Path) -> Iterator[RunningTorchServe]:
    pytest.importorskip("ts", reason="needs the `torchserve` extra")
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17")
    store, work = tmp_path / "store", tmp_path / "work"
    work.mkdir()
    assert torchserve_cli(["build", "compressibility", "--tiny", "--out", str(store)]) == 0
    inference, grpc_inference, metrics, management, grpc_management = free_ports(5)
    config = work / "config.properties"
    settings = ServerSettings(
        inference_port=inference,
        grpc_inference_port=grpc_inference,
        metrics_port=metrics,
        management_port=management,
        grpc_management_port=grpc_management,
    )
    spec = ArchiveSpec.from_archive(store / "compressibility.mar")
    config.write_text(render_properties(store, [spec], settings))
    # TorchServe keeps its pid file, worker sockets, key file and logs in TMPDIR / TEMP / the working
    # directory: all point into this test's directory so nothing is shared with another instance.
    env = {**os.environ, "TMPDIR": str(work), "TEMP": str(work)}
    log = work / "torchserve.log"
    launcher = Path(sys.executable).with_name("torchserve")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(launcher), "--foreground", "--ncs", "--ts-config", str(config)],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its Java frontend and Python workers share our process group
        )
    try:
        key_file = work / "key_file.json"
        deadline = time.monotonic() + 60
        while not key_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"TorchServe did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        time.sleep(0.2)  # the key file is written in one go right after it is created
        key = json.loads(key_file.read_text())["inference"]["key"]
        yield RunningTorchServe(grpc_port=grpc_inference, rest_port=inference, key=key, log=log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # The launcher may exit before its Java child; make sure the whole group is gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_real_torchserve_scores_like_the_in_process_scorer_and_needs_the_token(
    torchserve: RunningTorchServe,
) -> None:
    from services.torchserve.grpc_api import InferenceClient

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 24, 32, 3), dtype=np.uint8)
    images[1] = 128  # a flat image: a very small JPEG
    request = reward_pb2.ScoreRequest(
        samples=[reward_pb2.Sample(image=encode_raw(img), prompt=f"p{i}") for i, img in enumerate(images)]
    )
    scorer = CompressibilityScorer()
    expected = scorer.score(
        ScoreBatch(images=[to_chw_tensor(img) for img in images], prompts=["p"] * 4, metadata=[None] * 4)
    ).samples

    with grpc.insecure_channel(f"127.0.0.1:{torchserve.grpc_port}") as channel:
        client = InferenceClient(channel, torchserve.key)
        deadline = time.monotonic() + 60
        while True:  # the frontend answers before the model's worker has loaded
            try:
                response = client.score("compressibility", request, timeout=10)
                break
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    pytest.fail(f"TorchServe never served: {exc}\n{torchserve.log.read_text()[-3000:]}")
                time.sleep(0.2)

        assert response.model.name == "compressibility"
        assert response.model.checkpoint_sha256 == scorer.identity.checkpoint_sha256
        for name, values in expected.items():
            got = [s.values[name] for s in response.scores]
            assert got == values.tolist(), name  # bit-identical: same code, same float64

        with pytest.raises(ReplyError) as info:
            client.score("compressibility", reward_pb2.ScoreRequest(), timeout=10)
        assert (info.value.code, info.value.message) == (400, "request has no samples")

        for token in (None, "not-the-key"):
            with pytest.raises(grpc.RpcError) as refused:
                InferenceClient(channel, token).score("compressibility", request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _serving_client(torchserve: RunningTorchServe, channel: grpc.Channel):
    """An InferenceClient once the model's worker answers (the frontend is up before it)."""
    from services.torchserve.grpc_api import InferenceClient

    client = InferenceClient(channel, torchserve.key)
    probe = reward_pb2.ScoreRequest(
        samples=[reward_pb2.Sample(image=encode_raw(np.zeros((4, 4, 3), np.uint8)))]
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            client.score("compressibility", probe, timeout=10)
            return client
        except grpc.RpcError as exc:
            if time.monotonic() > deadline:
                pytest.fail(f"TorchServe never served: {exc}\n{torchserve.log.read_text()[-3000:]}")
            time.sleep(0.2)


def _rest_score(torchserve: RunningTorchServe, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{torchserve.rest_port}/predictions/compressibility",
        data=body,
        headers={"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {torchserve.key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_bad_requests_batched_with_good_ones_fail_alone_under_real_torchserve(
    torchserve: RunningTorchServe,
) -> None:
    """A wrong-length raw image (its sentence has a non-ASCII '·') next to good requests, sent at once
    over gRPC and REST: each bad one gets its 400 reply, the good ones their scores, the worker stays."""
    good_images = [np.full((8, 8, 3), v, np.uint8) for v in (10, 90, 170, 250)]
    good = [
        reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image=encode_raw(i), prompt="p")])
        for i in good_images
    ]
    short = reward_pb2.Image(
        encoding=reward_pb2.IMAGE_ENCODING_RAW_RGB8, height=8, width=8, data=b"\x00" * 10
    )
    bad = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image=short, prompt="p")])
    expected_error = "sample 0: raw RGB8 image has 10 bytes, expected height·width·3 = 8·8·3 = 192"
    scorer = CompressibilityScorer()
    expected = [
        scorer.score(ScoreBatch(images=[to_chw_tensor(i)], prompts=["p"], metadata=[None])).samples
        for i in good_images
    ]
    requests = [good[0], bad, good[1], good[2], bad, good[3]]

    with grpc.insecure_channel(f"127.0.0.1:{torchserve.grpc_port}") as channel:
        client = _serving_client(torchserve, channel)

        def over_grpc(request: reward_pb2.ScoreRequest) -> reward_pb2.ScoreResponse | ReplyError:
            try:
                return client.score("compressibility", request, timeout=30)
            except ReplyError as exc:
                return exc

        def over_rest(request: reward_pb2.ScoreRequest) -> tuple[int, bytes]:
            return _rest_score(torchserve, request.SerializeToString())

        with ThreadPoolExecutor(len(requests)) as pool:
            for _ in range(3):  # several rounds: TorchServe batches what arrives within its delay
                grpc_answers = list(pool.map(over_grpc, requests))
                rest_answers = list(pool.map(over_rest, requests))
                goods = iter(expected)
                for request, answer, (status, body) in zip(requests, grpc_answers, rest_answers, strict=True):
                    if request is bad:
                        assert isinstance(answer, ReplyError), answer
                        assert (answer.code, answer.message) == (400, expected_error)
                        assert status == 400 and body.decode() == f"e2po-error 400 {expected_error}"
                    else:
                        want = next(goods)
                        assert status == 200, body[:200]
                        for reply in (answer, reward_pb2.ScoreResponse.FromString(body)):
                            assert reply.scores[0].values["compressibility"] == want["compressibility"][0]
    log = torchserve.log.read_text()
    for sign in ("Worker died", "TooLongFrameException", "Retry worker"):
        assert sign not in log, log[-3000:]
