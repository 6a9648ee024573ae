"""Lifecycle of one reward server: bind, load the model, serve, drain.

Health (``grpc.health.v1``) reports NOT_SERVING while the model loads and again from the moment a
drain starts, so Kubernetes stops routing before the listener closes. A drain lets every accepted
request finish (the batcher keeps running through the grace period), then exits cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from protos import reward_pb2
from services.core.allocator import keep_freed_memory
from services.core.auth import TokenAuthenticator
from services.core.batcher import BatcherConfig, FairBatcher
from services.core.budget import DEFAULT_MAX_DECODED_PIXELS, PixelBudget
from services.core.metrics import ServerMetrics
from services.core.quota import QuotaConfig, QuotaLimiter
from services.core.request import RequestLimits
from services.core.runner import run_jobs
from services.core.scorer import Scorer
from services.core.servicer import IntakeLimits, RewardServicer, add_to_server
from services.core.tls import load_ca, load_key_pair

log = logging.getLogger(__name__)

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
READY_PREFIX = "listening on "
"""Start of the stdout line a serving process prints once it serves (``listening on HOST:PORT``): what
parents that start a server wait for (the trainer's local services, the benchmarks)."""


@dataclass(frozen=True, kw_only=True)
class TLSConfig:
    """Server TLS; with ``client_ca`` set, clients must present a certificate it signed (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything a reward server needs besides its scorer."""

    host: str = "127.0.0.1"
    """Bind address; loopback by default, ``0.0.0.0``/``[::]`` in a container."""
    port: int = 50051
    """0 picks a free port (reported by :meth:`RewardServer.start`)."""
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    limits: RequestLimits = field(default_factory=RequestLimits)
    max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS
    """Decoded pixels held at once over all requests (decoding, queued, in the model): the server's
    memory bound for images, ≈3 bytes each (3.2 GB by default). Past it, RESOURCE_EXHAUSTED."""
    intake: IntakeLimits = field(default_factory=IntakeLimits)
    """Stream idle timeout, streams per client and buffered request bytes (slow or hostile callers)."""
    max_concurrent_rpcs: int | None = 4096
    """RPCs in progress at once over all clients (gRPC answers RESOURCE_EXHAUSTED past it); None: no cap."""
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    """Per-client rate limit in images/s (the token file may set one per team)."""
    token_file: Path | None = None
    """Enables bearer-token auth (see :mod:`services.core.auth`); None = open server."""
    tls: TLSConfig | None = None
    metrics_port: int | None = None
    """Prometheus /metrics port (0 = any free port); None disables the endpoint."""
    drain_delay_s: float = 0.0
    """After health turns NOT_SERVING, keep serving this long so load balancers notice first."""
    drain_grace_s: float = 30.0
    """Time accepted requests get to finish once the listener closes (match the pod's grace period)."""
    max_connection_age_s: float | None = None
    """Close HTTP/2 connections after this age so long-lived clients rebalance across replicas."""
    malloc_trim_threshold_bytes: int | None = 1024**3
    """glibc only, set for the whole process at start: freed memory kept for reuse instead of returned
    to the kernel at once, buffers up to 32 MB served from the heap, and one heap for every thread (the
    model's worker thread included), so that requests and batches stop page-faulting their buffers in
    anew (:mod:`services.core.allocator`). None keeps glibc's defaults."""

    def __post_init__(self) -> None:
        if self.max_decoded_pixels < self.limits.max_pixels_per_request:
            raise ValueError(
                f"max_decoded_pixels ({self.max_decoded_pixels}) must be >= max_pixels_per_request "
                f"({self.limits.max_pixels_per_request}), or the largest request could never be scored"
            )
        if self.intake.max_buffered_request_bytes < self.limits.max_request_bytes:
            raise ValueError(
                f"max_buffered_request_bytes ({self.intake.max_buffered_request_bytes}) must be >= "
                f"max_request_bytes ({self.limits.max_request_bytes}), or the largest request could never "
                "be read"
            )
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1 or None, got {self.max_concurrent_rpcs}")


class RewardServer:
    """One process, one model. ``load_scorer`` runs in a thread after the port is bound."""

    def __init__(self, load_scorer: Callable[[], Scorer], model_name: str, config: ServerConfig) -> None:
        self.config = config
        self.model_name = model_name
        self._load_scorer = load_scorer
        self.metrics = ServerMetrics(model_name)
        auth = TokenAuthenticator.from_file(config.token_file) if config.token_file else None
        self.servicer = RewardServicer(
            limits=config.limits,
            metrics=self.metrics,
            auth=auth,
            model_name=model_name,
            pixel_budget=PixelBudget(config.max_decoded_pixels),
            quota=QuotaLimiter(config.quota),
            intake=config.intake,
        )
        self.health = health_aio.HealthServicer()
        self.batcher: FairBatcher | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Bind, load the model (health NOT_SERVING meanwhile), then report SERVING; return the port."""
        cfg = self.config
        if cfg.malloc_trim_threshold_bytes is not None:
            keep_freed_memory(cfg.malloc_trim_threshold_bytes)
        options = [
            ("grpc.max_receive_message_length", cfg.limits.max_request_bytes),
            ("grpc.max_send_message_length", cfg.limits.max_request_bytes),
        ]
        if cfg.max_connection_age_s is not None:
            options += [
                ("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(cfg.drain_grace_s * 1000)),
            ]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        add_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{cfg.host}:{cfg.port}"
        credentials = _server_credentials(cfg.tls) if cfg.tls is not None else None
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
        if port == 0:
            raise OSError(f"cannot bind {address}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        self.port = port
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.host, cfg.metrics_port)
        try:
            scorer = await asyncio.to_thread(self._load_scorer)
        except BaseException:
            # Close the listener before the error propagates, so the process exits without a dangling server.
            await server.stop(0)
            self.metrics.shutdown()
            raise
        self.batcher = FairBatcher(lambda jobs: run_jobs(scorer, jobs), cfg.batcher, observer=self.metrics)
        self.batcher.start()
        self.servicer.attach(scorer, self.batcher)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d", self.model_name, cfg.host, port)
        return port

    async def drain(self) -> None:
        """Stop taking work, finish what was accepted, close. Safe to call more than once."""
        if self._server is None or self.servicer.draining:
            await self._stopped.wait()
            return
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.config.drain_delay_s > 0:
            await asyncio.sleep(self.config.drain_delay_s)
        self.servicer.draining = True
        # Closes the listener at once; RPCs already running get the grace period to complete, and
        # they complete because the batcher keeps executing queued jobs until it is closed below.
        await self._server.stop(self.config.drain_grace_s)
        if self.batcher is not None:
            await self.batcher.close()
        self.metrics.shutdown()
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    async def run_until_signal(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain and return."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received; draining")
        await self.drain()

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)


def _server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """Credentials from files checked first (``services.core.tls``): a bad file is a sentence naming
    it, not gRPC's "Failed to bind to address"."""
    key, cert = load_key_pair(tls.cert, tls.key, "server")
    client_ca = load_ca(tls.client_ca, "client CA") if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
