"""TorchServe archives of the reward scorers.

    python -m services.torchserve build compressibility --tiny --out build/torchserve
    python -m services.torchserve build geneval --tiny --detector shapes --max-batch-images 16
    python -m services.torchserve build pickscore --checkpoint /models/pickscore --device cuda
    python -m services.torchserve config --model-store build/torchserve --host 0.0.0.0
    torchserve --foreground --ts-config build/torchserve/config.properties

``build`` takes the scorer flags of ``python -m services.serve`` (model source, device, scorer options,
batching and request limits) plus its own, writes ``<out>/<scorer>.mar`` and rewrites
``<out>/config.properties`` for every archive in ``<out>`` with loopback defaults; ``config`` rewrites
that file with other addresses or ports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services import server_args
from services.core.flags import add_flags, from_flags
from services.torchserve.archive import build_archive, write_properties
from services.torchserve.config import ServerSettings
from services.torchserve.spec import ArchiveSpec

DEFAULT_OUT = Path("build/torchserve")
# The services.serve flags an archive honours; the rest (transport, auth, queues, quotas, drain) belong
# to the gRPC server, and TorchServe has its own settings in config.properties.
ARCHIVE_FLAGS = frozenset(
    {
        "scorer",
        "tiny",
        "checkpoint",
        "device",
        "scorer_options",
        "max_batch_images",
        "max_delay_ms",
        "max_images_per_request",
        "max_request_bytes",
        "max_pixels",
        "max_pixels_per_request",
        "log_level",
    }
)


def spec_from_args(scorer_argv: list[str], batch_requests: int) -> ArchiveSpec:
    """Parse ``SCORER [services.serve flags]`` into an archive spec; flags it cannot honour are refused."""
    args = server_args.parse_args(scorer_argv)
    defaults = server_args.parse_args([args.scorer])
    used = ARCHIVE_FLAGS | set(args.scorer_options)
    ignored = sorted(k for k, v in vars(args).items() if k not in used and v != getattr(defaults, k, v))
    if ignored:
        names = ", ".join("--" + name.replace("_", "-") for name in ignored)
        raise ValueError(f"{names}: gRPC server flags; TorchServe's own settings are in config.properties")
    return ArchiveSpec(
        scorer=args.scorer,
        tiny=args.tiny,
        checkpoint=args.checkpoint,
        device=args.device,
        options=args.scorer_options,
        max_batch_images=args.max_batch_images,
        max_delay_ms=args.max_delay_ms,
        batch_requests=batch_requests,
        max_images_per_request=args.max_images_per_request,
        max_request_bytes=args.max_request_bytes,
        max_pixels=args.max_pixels,
        max_pixels_per_request=args.max_pixels_per_request,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m services.torchserve", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser(
        "build",
        allow_abbrev=False,
        help="build <scorer>.mar",
        description="Build an archive. Other flags are those of `python -m services.serve SCORER`.",
    )
    build.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model store directory")
    build.add_argument(
        "--batch-requests",
        type=int,
        default=ArchiveSpec.batch_requests,
        help="TorchServe batchSize: requests merged into one handler call",
    )
    config = sub.add_parser("config", allow_abbrev=False, help="(re)write a model store's config.properties")
    config.add_argument("--model-store", type=Path, default=DEFAULT_OUT)
    config.add_argument("--out", type=Path, help="file to write (default MODEL_STORE/config.properties)")
    add_flags(config, ServerSettings)
    args, rest = p.parse_known_args(argv)
    try:
        if args.command == "build":
            spec = spec_from_args(rest, args.batch_requests)
            mar = build_archive(spec, args.out)
            properties = write_properties(args.out, ServerSettings())
            print(f"archive: {mar}")
        else:
            if rest:
                p.error(f"unrecognized arguments: {' '.join(rest)}")
            properties = write_properties(args.model_store, from_flags(args, ServerSettings), args.out)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"config:  {properties}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
