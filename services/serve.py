"""Serve one reward model over gRPC.

    python -m services.serve compressibility --port 0
    python -m services.serve pickscore --checkpoint /models/PickScore_v1 --device cuda --host 0.0.0.0 \\
        --token-file /etc/reward/tokens --metrics-port 9464
    python -m services.serve geneval --detector shapes

A scorer may declare its own options (``add_arguments``); ``python -m services.serve SCORER --help`` lists
them, and their values reach its ``build`` as keywords.

Prints ``listening on HOST:PORT`` once the model is loaded and health reports SERVING; SIGTERM drains
in-flight work and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from services.core.server import READY_PREFIX, RewardServer
from services.registry import build_scorer
from services.server_args import config_from_args, parse_args


async def serve(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    server = RewardServer(
        lambda: build_scorer(
            args.scorer,
            checkpoint=args.checkpoint,
            tiny=args.tiny,
            device=args.device,
            **args.scorer_options,
        ),
        args.scorer,
        config,
    )
    port = await server.start()
    if server.metrics_port is not None:
        print(f"metrics on {config.host}:{server.metrics_port}", flush=True)
    print(f"{READY_PREFIX}{config.host}:{port}", flush=True)
    await server.run_until_signal()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config_from_args(args)  # validate limits before binding anything
        asyncio.run(serve(args))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
