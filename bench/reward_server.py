"""Serve one of the benchmark scorers with the product's RewardServer (run as a child process).

    python -m bench.reward_server clip [--sleep-per-image S] [--max-batch-images N] [--max-delay-ms D]
                                       [--contention-latency-slack X|none]

Prints ``listening on HOST:PORT metrics PORT`` when ready; SIGTERM drains and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable

from bench.common import use_torch_threads
from bench.scorers import NullScorer, SleepingScorer, bench_clip_scorer
from services.core.batcher import BatcherConfig
from services.core.flags import add_flags, from_flags
from services.core.scorer import Scorer
from services.core.server import READY_PREFIX, RewardServer, ServerConfig


def _geneval_shapes() -> Scorer:
    from services.geneval.scorer import GenEvalScorer

    return GenEvalScorer.build(detector="shapes")


SCORERS: dict[str, Callable[[], Scorer]] = {
    "clip": bench_clip_scorer,
    "null": NullScorer,
    "geneval-shapes": _geneval_shapes,
}
"""Scorer name → builder: the serving benchmark's CLIP, the free scorer, the shapes preset's reward."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.reward_server", description=__doc__.splitlines()[0])
    p.add_argument("scorer", choices=sorted(SCORERS))
    p.add_argument("--sleep-per-image", type=float, default=0.0, help="pad each batch to S·n seconds")
    add_flags(p, BatcherConfig)
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> Scorer:
    scorer = SCORERS[args.scorer]()
    return SleepingScorer(scorer, args.sleep_per_image) if args.sleep_per_image > 0 else scorer


async def serve(args: argparse.Namespace) -> None:
    config = ServerConfig(
        port=0,
        metrics_port=0,
        drain_grace_s=5.0,
        batcher=from_flags(args, BatcherConfig),
    )
    server = RewardServer(lambda: build(args), args.scorer, config)
    port = await server.start()
    print(f"{READY_PREFIX}{config.host}:{port} metrics {server.metrics_port}", flush=True)
    await server.run_until_signal()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    use_torch_threads()
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
