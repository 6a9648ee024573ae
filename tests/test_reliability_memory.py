"""Memory bounds: decoded pixels per request and per server.

Queue limits count images, but a ~50 KB PNG can decode to 50 MB: before these budgets a single request
of 512 such images (25 MB on the wire) asked the server for 25 GB. Each request now holds at most
``max_pixels_per_request`` decoded pixels (INVALID_ARGUMENT past it: split the request) and the server
at most ``max_decoded_pixels`` over all requests (RESOURCE_EXHAUSTED with a retry hint past it).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest

from protos import reward_pb2, reward_pb2_grpc
from services.core.batcher import BatcherConfig
from services.core.budget import BudgetExhausted, PixelBudget, Reservation
from services.core.codec import ImageError, ImageLimits
from services.core.request import RequestLimits
from services.core.server import ServerConfig
from tests.conftest import MeanPixelScorer, running_server
from tests.test_codec import png_bomb
from tests.test_reliability_fuzz import at_limit_bomb, report, server_process

SIDE = 128
"""Images of these tests: SIDE² pixels each, the per-image limit of the in-process servers."""


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _bombs(count: int, data: bytes, prompt: str = "b") -> reward_pb2.ScoreRequest:
    image = reward_pb2.Image(encoding=reward_pb2.IMAGE_ENCODING_PNG, data=data)
    return reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image=image, prompt=prompt)] * count)


def _limits(per_request_images: int) -> RequestLimits:
    return RequestLimits(
        max_pixels_per_request=per_request_images * SIDE * SIDE, image=ImageLimits(max_pixels=SIDE * SIDE)
    )


# -- the budget alone ------------------------------------------------------------------------------


def test_reservation_enforces_the_request_limit_and_the_shared_budget() -> None:
    budget = PixelBudget(100)
    first = Reservation(budget, max_pixels_per_request=60)
    first.take(40)
    with pytest.raises(ImageError, match="decode to more than 60 pixels"):
        first.take(30)  # 70 > the request's 60
    second = Reservation(budget, max_pixels_per_request=80)
    second.take(50)
    with pytest.raises(BudgetExhausted, match="memory budget"):
        second.take(20)  # 40 + 50 + 20 > the server's 100
    assert budget.used == 90  # a refused take takes nothing
    first.release()
    second.take(20)
    second.release()
    assert budget.used == 0
    with pytest.raises(BudgetExhausted):
        second.take(1)  # a released (answered or cancelled) request cannot take more


def test_budget_is_thread_safe() -> None:
    budget = PixelBudget(10**9)

    def work() -> None:
        for _ in range(10_000):
            reservation = Reservation(budget, 10)
            reservation.take(3)
            reservation.take(7)
            reservation.release()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert budget.used == 0


# -- on a live server ------------------------------------------------------------------------------


def test_request_over_its_pixel_budget_is_invalid_argument() -> None:
    bomb = png_bomb(SIDE, SIDE)

    async def main() -> None:
        scorer = MeanPixelScorer()
        config = ServerConfig(port=0, limits=_limits(per_request_images=2))
        async with running_server(scorer, config) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                assert len((await stub.Score(_bombs(2, bomb), timeout=30)).scores) == 2
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Score(_bombs(3, bomb), timeout=30)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "sample 2" in info.value.details() and "split it" in info.value.details()
            assert server.servicer.pixel_budget.used == 0
        assert len(scorer.seen_prompts()) == 2

    run(main())


def test_server_pixel_budget_refuses_with_a_retry_hint_and_frees_on_answer_and_cancel() -> None:
    bomb = png_bomb(SIDE, SIDE)

    async def main() -> None:
        gate = threading.Event()
        scorer = MeanPixelScorer(gate=gate)
        config = ServerConfig(
            port=0,
            limits=_limits(per_request_images=2),
            max_decoded_pixels=4 * SIDE * SIDE,
            batcher=BatcherConfig(max_batch_images=2, max_delay_ms=0),
        )
        async with running_server(scorer, config) as server:
            budget = server.servicer.pixel_budget
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                meta = (("x-e2po-client", "a"),)
                held = asyncio.ensure_future(stub.Score(_bombs(2, bomb, "held"), metadata=meta, timeout=30))
                # "held" must be inside the (gated) model before "queued" is sent, or the two may race.
                while budget.used < 2 * SIDE * SIDE or server.batcher.queued_images() > 0:
                    await asyncio.sleep(0.01)
                queued = stub.Score(_bombs(2, bomb, "queued"), metadata=meta, timeout=30)
                queued_task = asyncio.ensure_future(queued)
                while budget.used < 4 * SIDE * SIDE:
                    await asyncio.sleep(0.01)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Score(_bombs(1, bomb, "refused"), timeout=30)
                err = info.value
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "memory budget" in err.details() and "retry after" in err.details()
                assert int(dict(err.trailing_metadata())["retry-after-ms"]) >= 1
                queued.cancel()  # a cancelled request gives its pixels back
                with pytest.raises(asyncio.CancelledError):
                    await queued_task
                while budget.used > 2 * SIDE * SIDE:
                    await asyncio.sleep(0.01)
                gate.set()
                assert len((await held).scores) == 2
                assert budget.used == 0
                assert len((await stub.Score(_bombs(2, bomb, "after"), timeout=30)).scores) == 2
        assert "refused" not in scorer.seen_prompts() and "queued" not in scorer.seen_prompts()

    run(main())


def test_a_request_of_512_decompression_bombs_cannot_exhaust_memory(tmp_path: Path) -> None:
    """At the default limits: 512 PNGs of 4096² (25 MB on the wire, 25 GB decoded) against a server."""
    request = _bombs(512, at_limit_bomb())
    assert request.ByteSize() < RequestLimits().max_request_bytes

    with server_process(tmp_path / "server.log", "compressibility", "--log-level", "WARNING") as server:
        rss_before = server.rss()

        async def main() -> list[grpc.StatusCode]:
            options = [("grpc.max_send_message_length", 64 * 2**20)]
            async with grpc.aio.insecure_channel(server.endpoint, options=options) as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)

                async def one() -> grpc.StatusCode:
                    try:
                        await stub.Score(request, timeout=120)
                    except grpc.aio.AioRpcError as err:
                        assert "split it" in err.details() or "memory budget" in err.details(), err.details()
                        return err.code()
                    return grpc.StatusCode.OK

                return list(await asyncio.gather(*(one() for _ in range(4))))

        codes = run(main(), timeout=300)
        peak = server.peak_rss()
        assert server.proc.poll() is None
    assert set(codes) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
    # Each request decodes at most 2 images (32 MiP) before it is refused: 4 × 2 × 50 MB, plus copies.
    assert peak - rss_before < 1536 * 2**20, (rss_before, peak)
    report(
        "memory-bombs",
        requests=len(codes),
        images_per_request=512,
        wire_mb=round(request.ByteSize() / 2**20, 1),
        would_decode_gb=round(512 * 4096 * 4096 * 3 / 2**30, 1),
        rss_before_mb=round(rss_before / 2**20),
        peak_rss_mb=round(peak / 2**20),
    )
