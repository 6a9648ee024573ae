"""The reward server's command line: its flags (generated from the config dataclasses) and the
ServerConfig they make. Shared by ``python -m services.serve`` and ``python -m services.torchserve build``,
which takes the same scorer flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from services.core.batcher import BatcherConfig
from services.core.codec import ImageLimits
from services.core.flags import ArgumentAdder, add_flags, from_flags
from services.core.quota import QuotaConfig
from services.core.request import RequestLimits
from services.core.server import ServerConfig, TLSConfig
from services.core.servicer import IntakeLimits
from services.registry import SCORERS, scorer_class


class _OptionRecorder:
    """The argument group handed to a scorer's ``add_arguments``; remembers which options it declared."""

    def __init__(self, group: ArgumentAdder) -> None:
        self._group = group
        self.dests: list[str] = []

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = self._group.add_argument(*args, **kwargs)
        self.dests.append(action.dest)
        return action


def _scorer_options(p: argparse.ArgumentParser, argv: list[str]) -> tuple[str | None, list[str]]:
    """Add the named scorer's own options to ``p``; returns (scorer name, option dests).

    The scorer is the first argument naming a registered scorer; only its module is imported, so serving
    one model never pays for another's imports.
    """
    name = next((arg for arg in argv if arg in SCORERS), None)
    if name is None:
        return None, []
    add_arguments = getattr(scorer_class(name), "add_arguments", None)
    if add_arguments is None:
        return name, []
    recorder = _OptionRecorder(p.add_argument_group(f"{name} options"))
    add_arguments(recorder)
    return name, recorder.dests


SERVER_FLAG_SKIP = frozenset({"malloc_trim_threshold_bytes"})
"""ServerConfig fields whose flag is written by hand: the glibc threshold is given in MB."""


def build_parser() -> argparse.ArgumentParser:
    """Every server flag; a scorer's own options are added by :func:`parse_args`."""
    p = argparse.ArgumentParser(
        prog="python -m services.serve",
        description="Serve one reward model over gRPC.",
        epilog="Scorer-specific options: python -m services.serve SCORER --help",
    )
    p.add_argument("scorer", choices=sorted(SCORERS))
    p.add_argument("--tiny", action="store_true", help="tiny model built offline from a config (tests, demo)")
    p.add_argument("--checkpoint", help="hub id or local path of the real weights")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--token-file", type=Path, help="'name:token[:models[:images_per_s]]' lines; enables bearer auth"
    )
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA (mTLS)")
    d_srv = ServerConfig()
    add_flags(p.add_argument_group("server"), ServerConfig, skip=SERVER_FLAG_SKIP)
    add_flags(p.add_argument_group("batching and queues"), BatcherConfig)
    requests = p.add_argument_group("request and image limits")
    add_flags(requests, RequestLimits)
    add_flags(requests, ImageLimits)
    p.add_argument(
        "--quota-images-per-s",
        type=float,
        help="per-client rate limit (a token-file line may set its own); default unlimited",
    )
    p.add_argument(
        "--quota-burst-s",
        type=float,
        default=d_srv.quota.burst_s,
        help="seconds of quota a client may use at once after idling",
    )
    add_flags(p.add_argument_group("what a caller may hold open"), IntakeLimits)
    p.add_argument(
        "--malloc-trim-threshold-mb",
        type=int,
        default=(d_srv.malloc_trim_threshold_bytes or 0) // 2**20,
        help="glibc: freed memory kept for reuse, buffers up to 32 MB from one heap shared by all threads; "
        "0 keeps the defaults",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = build_parser()
    option_scorer, option_dests = _scorer_options(p, argv)
    args = p.parse_args(argv)
    if option_scorer is not None and option_scorer != args.scorer:
        p.error(f"options of {option_scorer!r} were read, but the scorer is {args.scorer!r}")
    args.scorer_options = {dest: getattr(args, dest) for dest in option_dests}
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        p.error("--tls-client-ca needs --tls-cert/--tls-key")
    return args


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    tls = None
    if args.tls_cert is not None:
        tls = TLSConfig(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)
    return from_flags(
        args,
        ServerConfig,
        skip=SERVER_FLAG_SKIP,
        batcher=from_flags(args, BatcherConfig),
        limits=from_flags(args, RequestLimits, image=from_flags(args, ImageLimits)),
        intake=from_flags(args, IntakeLimits),
        quota=QuotaConfig(images_per_s=args.quota_images_per_s, burst_s=args.quota_burst_s),
        token_file=args.token_file,
        tls=tls,
        malloc_trim_threshold_bytes=args.malloc_trim_threshold_mb * 2**20 or None,
    )
