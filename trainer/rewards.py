"""Rewards from gRPC services: R = Σ_k w_k·R_k over the configured endpoints (DiffusionNFT's weighted sum).

Each decoded rollout chunk is submitted at once (``submit``), so scoring overlaps the sampling of the
next chunk; ``collect`` waits for all of them. Services without an endpoint are started locally on
loopback (``python -m services.serve NAME --port 0 …``) and stopped at exit. A reward is only ever a
value a service returned: failures beyond the client's retries and deadline raise, and the run stops.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from services.client import GrpcRewardClient, RewardClient, RewardError
from services.core.server import READY_PREFIX
from trainer import children
from trainer.validation import check, positive

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RewardSpec:
    """One reward: a service endpoint (or a locally started one) and its weight in R = Σ w·R_k."""

    name: str
    """Service name, e.g. ``geneval``; also the prefix of its logged metrics."""
    output: str = ""
    """Which per-sample output is the reward (default: the service's first declared output)."""
    weight: float = 1.0
    """w_k in R = Σ_k w_k·R_k (a weighted sum of raw scores, as DiffusionNFT)."""
    endpoint: str = ""
    """HOST:PORT of a running service; empty = start one locally with ``local_args``."""
    local_args: tuple[str, ...] = ()
    """Arguments after ``python -m services.serve NAME`` when started locally."""

    @classmethod
    def parse(cls, text: str) -> RewardSpec:
        """``geneval=host:50051,weight=1,output=geneval/score`` (``--reward-endpoint``) → RewardSpec."""
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"--reward-endpoint {text!r}: expected NAME=HOST:PORT[,weight=W][,output=O]")
        endpoint, *options = rest.split(",")
        spec = cls(name=name.strip(), endpoint=endpoint.strip())
        for option in options:
            key, _, value = option.partition("=")
            if key == "weight":
                spec.weight = float(value)
            elif key == "output":
                spec.output = value
            else:
                raise ValueError(f"--reward-endpoint {text!r}: unknown option {key!r} (weight, output)")
        return spec

    def __post_init__(self) -> None:
        check("reward", "name", self.name, bool(self.name), "a service name")
        check("reward", "weight", self.weight, math.isfinite(self.weight), "a finite number")


@dataclass(kw_only=True)
class RewardConfig:
    """The rewards of a run and how long to wait for them."""

    rewards: list[RewardSpec] = field(default_factory=list)
    """Every reward summed into R; at least one (a preset's, or ``--reward-endpoint``)."""
    timeout_s: float = 600.0
    """Deadline for one chunk's scores, retries included; past it the run fails with a clear error."""
    token_env: str = "E2PO_REWARD_TOKEN"
    """Environment variable holding the bearer token (tokens never go into config.json)."""
    connect_timeout_s: float = 120.0
    """How long the start waits for each reward service to answer (a pod still being scheduled);
    past it the run stops with the endpoint named."""

    def __post_init__(self) -> None:
        positive("reward", self, "timeout_s", "connect_timeout_s")
        for spec in self.rewards:
            spec.__post_init__()


class RewardUnavailable(RuntimeError):
    """A reward service could not score a chunk within its deadline; the run cannot continue honestly."""


@dataclass
class ChunkScores:
    """Scores of one chunk: every service output, and the weighted total."""

    indices: torch.Tensor
    outputs: dict[str, np.ndarray]
    total: np.ndarray


class LocalService:
    """A reward service started as a subprocess on a free loopback port."""

    def __init__(self, name: str, args: Sequence[str]) -> None:
        self.name, self.args = name, list(args)
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    async def start(self, timeout_s: float = 600.0) -> str:
        cmd = [
            sys.executable,
            "-m",
            "services.serve",
            self.name,
            "--port",
            "0",
            "--log-level",
            "WARNING",
            *self.args,
        ]
        self.proc = children.popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            line = await asyncio.wait_for(asyncio.to_thread(self._listening_line), timeout_s)
        except TimeoutError:
            self.stop()
            raise RewardUnavailable(
                f"local {self.name} service did not start within {timeout_s:.0f} s"
            ) from None
        if not line.startswith(READY_PREFIX):
            self.stop()
            raise RewardUnavailable(f"local {self.name} service failed to start (command: {' '.join(cmd)})")
        self.endpoint = line.removeprefix(READY_PREFIX).strip()
        return self.endpoint

    def _listening_line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(READY_PREFIX):
                return line
        return ""

    def stop(self) -> None:
        if self.proc is not None:
            children.stop(self.proc)


class RewardSet:
    """All configured rewards of a run."""

    def __init__(self, config: RewardConfig) -> None:
        if not config.rewards:
            raise ValueError("no reward configured: give --reward-endpoint NAME=HOST:PORT or use a preset")
        self.config = config
        self.specs: list[RewardSpec] = list(config.rewards)
        self._local: list[LocalService] = []
        self._clients: dict[str, RewardClient] = {}
        self.identities: dict[str, dict[str, Any]] = {}
        self._pending: list[asyncio.Task[ChunkScores]] = []

    async def connect(self, clients: Mapping[str, RewardClient] | None = None) -> None:
        """Bind every reward to a client, before any scoring: the one ``clients`` gives for its name
        (an in-process scorer, another transport), else a gRPC client of its endpoint, with a local
        service started first for a reward that names none. Each is described once, so a reward that
        is unreachable, or lacks the configured output, stops the run here, naming it."""
        token = os.environ.get(self.config.token_env) or None
        for spec in self.specs:
            client = (clients or {}).get(spec.name)
            where = "in process"
            if client is None:
                where = spec.endpoint
                if not where:
                    service = LocalService(spec.name, spec.local_args)
                    self._local.append(service)
                    where = await service.start()
                    log.info("started local %s reward service on %s", spec.name, where)
                client = GrpcRewardClient(where, token=token, timeout_s=self.config.timeout_s)
            await self._bind(spec, client, where)

    async def _bind(self, spec: RewardSpec, client: RewardClient, where: str) -> None:
        try:
            info = await client.describe(timeout_s=self.config.connect_timeout_s)
        except RewardError as exc:
            raise RewardUnavailable(f"reward {spec.name!r} at {where}: {exc}") from None
        if not spec.output:
            spec.output = info.outputs[0]
        if spec.output not in info.outputs:
            raise ValueError(
                f"reward {spec.name!r}: service has no output {spec.output!r} ({list(info.outputs)})"
            )
        self._clients[spec.name] = client
        self.identities[spec.name] = {
            "endpoint": where,
            "name": info.name,
            "version": info.version,
            "checkpoint_sha256": info.checkpoint_sha256,
            "output": spec.output,
            "weight": spec.weight,
        }

    def submit(
        self,
        indices: torch.Tensor,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None],
    ) -> None:
        """Start scoring a chunk (uint8 images (n, 3, H, W)) in the background."""
        self._pending.append(
            asyncio.ensure_future(self._score(indices, images, list(prompts), list(metadata)))
        )

    async def collect(self) -> list[ChunkScores]:
        """Wait for every submitted chunk; raise RewardUnavailable if any could not be scored."""
        pending, self._pending = self._pending, []
        try:
            return list(await asyncio.gather(*pending))
        except BaseException:
            for task in pending:
                task.cancel()
            raise

    async def _score(
        self, indices: torch.Tensor, images: torch.Tensor, prompts: list[str], metadata: list[Any]
    ) -> ChunkScores:
        needs_metadata = any(m is not None for m in metadata)

        async def one(spec: RewardSpec) -> dict[str, np.ndarray]:
            try:
                scores = await self._clients[spec.name].score(
                    images, prompts, metadata=metadata if needs_metadata else None
                )
            except RewardError as exc:
                raise RewardUnavailable(f"reward {spec.name!r} failed for a rollout chunk: {exc}") from None
            return scores.values

        results = await asyncio.gather(*(one(spec) for spec in self.specs))
        outputs: dict[str, np.ndarray] = {}
        total = np.zeros(len(prompts), dtype=np.float64)
        for spec, values in zip(self.specs, results, strict=True):
            outputs.update(values)
            total += spec.weight * values[spec.output]
        return ChunkScores(indices=indices, outputs=outputs, total=total)

    async def close(self) -> None:
        for task in self._pending:
            task.cancel()
        for client in self._clients.values():
            await client.close()
        for service in self._local:
            await asyncio.to_thread(service.stop)
