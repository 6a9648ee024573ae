"""Per-client quotas: the token bucket alone (fake clock), its token-file and CLI settings, and on a
live server (RESOURCE_EXHAUSTED with a retry hint, per-team rates, refunds, enforcement over time)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import reward_pb2, reward_pb2_grpc
from services.client import GrpcRewardClient, RetryPolicy, RewardError
from services.core.auth import TokenAuthenticator
from services.core.codec import encode_raw
from services.core.quota import QuotaConfig, QuotaExceeded, QuotaLimiter
from services.core.request import RequestLimits
from services.core.server import ServerConfig
from services.serve import config_from_args, parse_args
from tests.conftest import MeanPixelScorer, running_server, solid_images

TOKEN_A = "token-of-team-a-0123456789abcdef"
TOKEN_B = "token-of-team-b-fedcba9876543210"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- the bucket ------------------------------------------------------------------------------------


def test_bucket_admits_its_burst_then_refuses_with_the_exact_wait() -> None:
    clock = FakeClock()
    quota = QuotaLimiter(QuotaConfig(images_per_s=10, burst_s=1.0), clock=clock)
    quota.charge("a", 6)
    quota.charge("a", 4)  # the whole bucket (10 images) in one go
    with pytest.raises(QuotaExceeded) as info:
        quota.charge("a", 3)
    assert info.value.retry_after_s == pytest.approx(0.3)  # 3 images at 10/s
    clock.now += 0.29
    with pytest.raises(QuotaExceeded):
        quota.charge("a", 3)
    clock.now += 0.01
    quota.charge("a", 3)


def test_clients_have_separate_buckets_and_their_own_rates() -> None:
    clock = FakeClock()
    quota = QuotaLimiter(QuotaConfig(images_per_s=2, burst_s=1.0), clock=clock)
    quota.charge("a", 2)
    quota.charge("b", 2)  # a's use does not touch b
    quota.charge("c", 50, rate=50)  # a per-team rate overrides the default
    with pytest.raises(QuotaExceeded):
        quota.charge("a", 1)
    unlimited = QuotaLimiter(QuotaConfig(), clock=clock)
    for _ in range(100):
        unlimited.charge("a", 512)
    assert unlimited.num_clients() == 0  # no rate, no bucket kept


def test_request_larger_than_the_bucket_passes_when_full_and_leaves_debt() -> None:
    clock = FakeClock()
    quota = QuotaLimiter(QuotaConfig(images_per_s=4, burst_s=1.0), clock=clock)
    quota.charge("a", 20)  # 5 s worth of quota: allowed once, from a full bucket
    with pytest.raises(QuotaExceeded) as info:
        quota.charge("a", 1)
    assert info.value.retry_after_s == pytest.approx((16 + 1) / 4)  # pay the debt, then one image


def test_long_run_rate_never_exceeds_the_quota() -> None:
    clock = FakeClock()
    rate, burst_s = 25.0, 2.0
    quota = QuotaLimiter(QuotaConfig(images_per_s=rate, burst_s=burst_s), clock=clock)
    rng = np.random.default_rng(0)
    admitted, start = 0, clock.now
    while clock.now - start < 60:
        size = int(rng.integers(1, 9))
        try:
            quota.charge("greedy", size)
            admitted += size
        except QuotaExceeded:
            pass
        clock.now += float(rng.exponential(0.01))  # ~100 tries per second, 4× the quota
    assert admitted <= rate * (clock.now - start) + rate * burst_s
    assert admitted >= 0.9 * rate * (clock.now - start)  # and the quota is actually usable


def test_refund_returns_images_up_to_the_bucket_size() -> None:
    clock = FakeClock()
    quota = QuotaLimiter(QuotaConfig(images_per_s=10, burst_s=1.0), clock=clock)
    quota.charge("a", 10)
    quota.refund("a", 10)
    quota.charge("a", 10)
    quota.refund("a", 1000)  # never more than a full bucket
    quota.charge("a", 10)
    with pytest.raises(QuotaExceeded):
        quota.charge("a", 1)


def test_idle_clients_are_forgotten_so_memory_stays_bounded() -> None:
    clock = FakeClock()
    quota = QuotaLimiter(QuotaConfig(images_per_s=100), clock=clock)
    for i in range(10 * QuotaLimiter.MAX_IDLE_BUCKETS):
        quota.charge(f"peer-{i}", 1)
        clock.now += 0.1  # each bucket refills before the next client arrives
    assert quota.num_clients() <= QuotaLimiter.MAX_IDLE_BUCKETS + 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images_per_s": 0}, "positive"),
        ({"images_per_s": float("nan")}, "positive"),
        ({"burst_s": 0}, "> 0"),
    ],
)
def test_bad_quota_config_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuotaConfig(**kwargs)


# -- configuration ---------------------------------------------------------------------------------


def test_token_file_fourth_field_sets_a_team_quota_and_old_lines_still_parse(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(
        f"team-a:{TOKEN_A}\n"  # two fields: every model, server quota
        f"team-b:{TOKEN_B}:meanpixel,geneval\n"  # three fields: as before
        "team-c:token-of-team-c-0000000000000000:*:12.5\n"  # four: every model, 12.5 images/s
        "team-d:token-of-team-d-0000000000000000:meanpixel:3\n"
    )
    auth = TokenAuthenticator.from_file(path)

    def principal(token: str):
        return auth.authenticate([("authorization", f"Bearer {token}")], "meanpixel")

    assert (principal(TOKEN_A).models, principal(TOKEN_A).images_per_s) == (None, None)
    assert principal(TOKEN_B).models == frozenset({"meanpixel", "geneval"})
    assert principal("token-of-team-c-0000000000000000").models is None
    assert principal("token-of-team-c-0000000000000000").images_per_s == 12.5
    assert principal("token-of-team-d-0000000000000000").images_per_s == 3.0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (f"team:{TOKEN_A}:*:fast", "quota must be a number"),
        (f"team:{TOKEN_A}:*:-1", "positive"),
        (f"team:{TOKEN_A}::5", "empty model list"),
        (f"team:{TOKEN_A}:*:5:extra", "expected 'name:token'"),
    ],
)
def test_token_file_quota_errors_are_clear(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        TokenAuthenticator.from_file(path)
    assert TOKEN_A not in message


def test_serve_flags_set_the_quota() -> None:
    args = parse_args(["compressibility", "--quota-images-per-s", "40", "--quota-burst-s", "0.5"])
    config = config_from_args(args)
    assert config.quota == QuotaConfig(images_per_s=40.0, burst_s=0.5)
    assert config_from_args(parse_args(["compressibility"])).quota.images_per_s is None


# -- on a live server ------------------------------------------------------------------------------


def _request(num_images: int, value: int = 9) -> reward_pb2.ScoreRequest:
    image = encode_raw(np.full((4, 4, 3), value, np.uint8))
    return reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image=image, prompt="q")] * num_images)


def test_over_quota_is_resource_exhausted_with_a_hint_and_the_client_retry_succeeds() -> None:
    async def main() -> None:
        config = ServerConfig(port=0, quota=QuotaConfig(images_per_s=20, burst_s=0.5))  # bucket: 10
        scorer = MeanPixelScorer()
        async with running_server(scorer, config) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                meta = (("x-e2po-client", "team-x"),)
                await stub.Score(_request(10), metadata=meta, timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Score(_request(4), metadata=meta, timeout=10)
                err = info.value
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "quota" in err.details() and "retry after" in err.details()
                hint_ms = int(dict(err.trailing_metadata())["retry-after-ms"])
                assert 100 <= hint_ms <= 250  # ≈ 4 images at 20/s, less the refill since
                # Another client is not affected by team-x's quota.
                await stub.Score(_request(4), metadata=(("x-e2po-client", "team-y"),), timeout=10)
            async with GrpcRewardClient(f"127.0.0.1:{server.port}", client_name="team-x") as client:
                scores = await client.score(solid_images([255] * 4), "retry")
            assert scores.values["meanpixel"].tolist() == [1.0] * 4
        assert len(scorer.seen_prompts()) == 10 + 4 + 4

    run(main())


def test_team_quota_from_the_token_file_and_refunds_for_refused_work(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text(f"team-a:{TOKEN_A}:*:8\nteam-b:{TOKEN_B}\n")

    async def main() -> str:
        config = ServerConfig(port=0, token_file=tmp_path / "tokens", metrics_port=0)
        async with running_server(MeanPixelScorer(), config) as server:
            endpoint = f"127.0.0.1:{server.port}"
            no_retry = RetryPolicy(max_attempts=1)
            async with (
                GrpcRewardClient(endpoint, token=TOKEN_A, retry=no_retry) as team_a,
                GrpcRewardClient(endpoint, token=TOKEN_B, retry=no_retry) as team_b,
            ):
                # An invalid request never reaches the model and costs no quota.
                with pytest.raises(RewardError) as info:
                    await team_a.score(solid_images([1] * 8), "x", metadata=[{"reject": 1}] * 8)
                assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
                await team_a.score(solid_images([1] * 8), "x")  # the whole bucket of 8
                with pytest.raises(RewardError) as info:
                    await team_a.score(solid_images([1]), "x")
                assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota" in info.value.message
                for _ in range(5):  # team-b has no quota line: unlimited
                    await team_b.score(solid_images([2] * 64), "y")
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())

    text = run(main())
    assert 'reward_refused_requests_total{model="meanpixel",reason="quota"} 1.0' in text
    assert TOKEN_A not in text and TOKEN_B not in text


def test_quota_is_enforced_over_time_on_a_live_server() -> None:
    """A client retrying as fast as the hints allow gets its quota's worth of images, no more."""
    rate, burst_s, window_s = 40.0, 0.25, 2.0

    async def main() -> tuple[int, float]:
        config = ServerConfig(port=0, quota=QuotaConfig(images_per_s=rate, burst_s=burst_s))
        async with running_server(MeanPixelScorer(), config) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                meta = (("x-e2po-client", "greedy"),)
                admitted = 0
                started = time.perf_counter()

                async def worker() -> None:
                    nonlocal admitted
                    while time.perf_counter() - started < window_s:
                        try:
                            await stub.Score(_request(2), metadata=meta, timeout=10)
                            admitted += 2
                        except grpc.aio.AioRpcError as err:
                            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                            await asyncio.sleep(int(dict(err.trailing_metadata())["retry-after-ms"]) / 1000)

                await asyncio.gather(*(worker() for _ in range(4)))
                return admitted, time.perf_counter() - started

    admitted, elapsed = run(main())
    assert admitted <= rate * elapsed + rate * burst_s + 2, (admitted, elapsed)
    assert admitted >= 0.6 * rate * window_s, (admitted, elapsed)  # the quota is usable, not a wall


def test_a_trainer_over_its_quota_is_slowed_down_not_failed() -> None:
    """The bundled client (4 concurrent requests, 10 tries each) against a quota a quarter of its demand."""
    rate = 100.0

    async def main() -> tuple[float, int]:
        config = ServerConfig(
            port=0,
            quota=QuotaConfig(images_per_s=rate, burst_s=0.2),  # bucket: 20 images
            limits=RequestLimits(max_images_per_request=16),
        )
        scorer = MeanPixelScorer()
        async with running_server(scorer, config) as server:
            async with GrpcRewardClient(f"127.0.0.1:{server.port}", client_name="trainer") as client:
                started = time.perf_counter()
                scores = await asyncio.gather(
                    *(client.score(solid_images([c] * 50), f"chunk{c}") for c in range(4))
                )
                elapsed = time.perf_counter() - started
        for c, chunk in enumerate(scores):
            assert chunk.values["meanpixel"].tolist() == pytest.approx([c / 255] * 50)
        return elapsed, len(scorer.seen_prompts())

    elapsed, scored = run(main())
    assert scored == 200  # every image exactly once, none lost to a retry
    assert elapsed >= (200 - 20) / rate * 0.9  # the quota held: at most one bucket ahead of the rate
