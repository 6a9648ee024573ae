"""Fairness benchmark: a small client's latency while another client floods the same reward server.

    python -m bench.fairness [--quick] [--torch-threads N]

The small client sends 4-image requests one at a time, either the moment it has an answer or after a
0.3-s pause (an evaluation loop preparing its next images); the flooder keeps two 64-image requests in
flight under another client name. Each pass measures the small client alone, then under the flood (its
latencies there leave out its first request, which arrives while the flood runs unopposed, and is
reported on its own). Servers: our gRPC server with its defaults (``max_batch_images`` 32, batches kept
short while a light client is active: ``contention_latency_slack``), with that limit off (always-full
batches of 32), with ``max_batch_images`` 4, with the 100-ms activity window of earlier versions, and the
HTTP baseline, which has no per-client queues. For our server, what the model ran in the flooded
phases (images/s served to both clients, mean batch, time per batch, busy share) is read from its
metrics: the flood's own count moves in whole 64-image calls, too coarse to compare throughput.
Writes ``bench/results/fairness.json`` (``fairness_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.common import (
    free_port,
    load_average,
    percentile_ms,
    print_table,
    use_server_allocator,
    use_torch_threads,
    write_results,
)
from bench.http_pickle_baseline import HttpClient, gunicorn_server
from bench.images import synthetic_images
from bench.load import PROMPT, pick
from bench.processes import ServedEndpoint, reward_server, scrape_batch_metrics
from services.client import GrpcRewardClient

SMALL_IMAGES = 4
THINK_S = (0.0, 0.3)
"""The small client's pause between an answer and its next request."""
FLOOD_IMAGES = 64
FLOOD_IN_FLIGHT = 2


@dataclass(frozen=True, kw_only=True)
class Plan:
    servers: tuple[str, ...]
    phase_s: float
    passes: int
    think_s: tuple[float, ...] = THINK_S


GRPC_SERVERS: dict[str, list[str]] = {
    "grpc-default": [],
    "grpc-full-batches": ["--contention-latency-slack", "none"],
    "grpc-batch4": ["--max-batch-images", "4"],
    "grpc-window-100ms": ["--active-window-ms", "100"],
}
"""Our server's settings compared: defaults (batches kept short while the small client is active),
always-full batches of 32 (the contention limit off), batches of at most 4, and a client counted as
active for only 100 ms after its answer."""

FULL = Plan(
    servers=("grpc-default", "grpc-full-batches", "grpc-batch4", "grpc-window-100ms", "http"),
    phase_s=12.0,
    passes=2,
)
QUICK = Plan(servers=("grpc-default",), phase_s=5.0, passes=1, think_s=(0.0,))


@dataclass(kw_only=True)
class Phase:
    small_latencies: list[float]
    flood_images: int
    seconds: float
    batches: dict[str, float] | None = None
    """What our server's model ran during the phase (batches, images, model seconds; from its
    metrics): exact to a batch, where ``flood_images`` counts whole 64-image calls."""


# -- gRPC --------------------------------------------------------------------------------------------


async def _grpc_phase(
    served: ServedEndpoint, pool: np.ndarray, seconds: float, flood: bool, think_s: float
) -> Phase:
    endpoint = served.endpoint
    small = GrpcRewardClient(endpoint, client_name="small")
    flooder = GrpcRewardClient(endpoint, client_name="flood", max_concurrent_requests=FLOOD_IN_FLIGHT)
    stop = asyncio.Event()
    flood_done = [0]
    first_flood = asyncio.Event()

    async def flood_loop(offset: int) -> None:
        cursor = offset
        while not stop.is_set():
            await flooder.score(pick(pool, cursor, FLOOD_IMAGES), PROMPT)
            cursor += FLOOD_IMAGES
            flood_done[0] += FLOOD_IMAGES
            first_flood.set()

    tasks = [asyncio.create_task(flood_loop(i * 7)) for i in range(FLOOD_IN_FLIGHT)] if flood else []
    try:
        if flood:
            # Steady state: the flood's queue is full and its first batches have run.
            await asyncio.wait_for(first_flood.wait(), 120)
        flood_start = flood_done[0]
        batches_before = await asyncio.to_thread(scrape_batch_metrics, served.metrics_port)
        latencies = []
        started = time.perf_counter()
        cursor = 0
        while time.perf_counter() - started < seconds:
            await asyncio.sleep(think_s)
            t0 = time.perf_counter()
            await small.score(pick(pool, cursor, SMALL_IMAGES), PROMPT)
            latencies.append(time.perf_counter() - t0)
            cursor += SMALL_IMAGES
        elapsed = time.perf_counter() - started
        batches_after = await asyncio.to_thread(scrape_batch_metrics, served.metrics_port)
        return Phase(
            small_latencies=latencies,
            flood_images=flood_done[0] - flood_start,
            seconds=elapsed,
            batches={key: batches_after[key] - batches_before[key] for key in batches_after},
        )
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await small.close()
        await flooder.close()


# -- HTTP --------------------------------------------------------------------------------------------


def _http_phase(url: str, pool: np.ndarray, seconds: float, flood: bool, think_s: float) -> Phase:
    stop = threading.Event()
    first_flood = threading.Event()
    lock = threading.Lock()
    flood_done = [0]

    def flood_loop(offset: int) -> None:
        client = HttpClient(url)
        cursor = offset
        try:
            while not stop.is_set():
                client.score(pick(pool, cursor, FLOOD_IMAGES), [PROMPT] * FLOOD_IMAGES)
                cursor += FLOOD_IMAGES
                with lock:
                    flood_done[0] += FLOOD_IMAGES
                first_flood.set()
        finally:
            client.close()

    threads = [
        threading.Thread(target=flood_loop, args=(i * 7,), daemon=True) for i in range(FLOOD_IN_FLIGHT)
    ]
    small = HttpClient(url)
    try:
        if flood:
            for thread in threads:
                thread.start()
            first_flood.wait(120)
        flood_start = flood_done[0]
        latencies = []
        started = time.perf_counter()
        cursor = 0
        while time.perf_counter() - started < seconds:
            time.sleep(think_s)
            t0 = time.perf_counter()
            small.score(pick(pool, cursor, SMALL_IMAGES), [PROMPT] * SMALL_IMAGES)
            latencies.append(time.perf_counter() - t0)
            cursor += SMALL_IMAGES
        elapsed = time.perf_counter() - started
        return Phase(small_latencies=latencies, flood_images=flood_done[0] - flood_start, seconds=elapsed)
    finally:
        stop.set()
        small.close()
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=300)


# -- orchestration -----------------------------------------------------------------------------------


@contextmanager
def _server(name: str) -> Iterator[Callable[[np.ndarray, float, bool, float], Phase]]:
    """The named server, and a function running one phase against it."""
    if name == "http":
        with gunicorn_server(free_port(), "clip") as url:
            yield lambda pool, seconds, flood, think_s: _http_phase(url, pool, seconds, flood, think_s)
        return
    with reward_server(["clip", *GRPC_SERVERS[name]]) as endpoint:
        yield lambda pool, seconds, flood, think_s: asyncio.run(
            _grpc_phase(endpoint, pool, seconds, flood, think_s)
        )


@dataclass(kw_only=True)
class Tally:
    """One (server, think time) pair's phases, pooled over passes."""

    solo: list[float] = field(default_factory=list)
    flooded: list[float] = field(default_factory=list)
    firsts: list[float] = field(default_factory=list)
    flood_images: int = 0
    flood_seconds: float = 0.0
    flooded_batches: dict[str, float] = field(default_factory=dict)

    def add(self, solo: Phase, flooded: Phase) -> None:
        self.solo += solo.small_latencies
        # The first request of a flooded phase comes from a client idle until then: it finds a batch
        # already running that no limit could have kept short. Reported on its own.
        self.firsts.append(flooded.small_latencies[0])
        self.flooded += flooded.small_latencies[1:]
        self.flood_images += flooded.flood_images
        self.flood_seconds += flooded.seconds
        for key, value in (flooded.batches or {}).items():
            self.flooded_batches[key] = self.flooded_batches.get(key, 0.0) + value

    def row(self, server: str, think_s: float) -> dict[str, Any]:
        seconds = self.flood_seconds
        row = {
            "server": server,
            "small_think_s": think_s,
            "solo_requests": len(self.solo),
            "solo_p50_ms": percentile_ms(self.solo, 50),
            "solo_p99_ms": percentile_ms(self.solo, 99),
            "flooded_requests": len(self.flooded),
            "flooded_p50_ms": percentile_ms(self.flooded, 50),
            "flooded_p99_ms": percentile_ms(self.flooded, 99),
            "flood_images_per_s": self.flood_images / seconds if seconds else None,
            # What the small client got meanwhile: the flood's loss is largely the share it gave up.
            "small_images_per_s_flooded": SMALL_IMAGES * (len(self.flooded) + len(self.firsts)) / seconds
            if seconds
            else None,
            "first_flooded_ms": [1000.0 * t for t in self.firsts],
        }
        executed = self.flooded_batches
        if executed.get("batches") and seconds:
            # Both clients together as the model served them, and how: the throughput a setting costs
            # shows here as batch size and time per batch.
            row["served_images_per_s"] = executed["images"] / seconds
            row["mean_batch"] = executed["images"] / executed["batches"]
            row["batch_ms"] = 1000.0 * executed["model_seconds"] / executed["batches"]
            row["model_busy"] = executed["model_seconds"] / seconds
        row["p99_ratio"] = row["flooded_p99_ms"] / row["solo_p99_ms"]
        return row


def run(plan: Plan, pool: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for name in plan.servers:
        tallies = {think_s: Tally() for think_s in plan.think_s}
        with _server(name) as phase:
            for index in range(plan.passes):
                for think_s, tally in tallies.items():
                    solo = phase(pool, plan.phase_s, False, think_s)
                    tally.add(solo, phase(pool, plan.phase_s, True, think_s))
                print(f"  {name}: pass {index + 1}/{plan.passes} done", flush=True)
        rows += [tally.row(name, think_s) for think_s, tally in tallies.items()]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="our server with its defaults only, one pass")
    p.add_argument("--torch-threads", type=int, default=1, help="intra-op threads of every model process")
    args = p.parse_args(argv)
    threads = use_torch_threads(args.torch_threads)
    allocator_tuned = use_server_allocator()
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    load_before = load_average()
    rows = run(plan, synthetic_images(64))
    print_table(
        f"Small client ({SMALL_IMAGES} images/request) alone and while another client keeps "
        f"{FLOOD_IN_FLIGHT}×{FLOOD_IMAGES} images in flight",
        [
            *("server", "think s", "solo p50", "solo p99", "flooded p50", "flooded p99", "p99 ratio"),
            *("first flooded (max)", "flood img/s", "small img/s"),
        ],
        [
            [
                r["server"],
                r["small_think_s"],
                r["solo_p50_ms"],
                r["solo_p99_ms"],
                r["flooded_p50_ms"],
                r["flooded_p99_ms"],
                r["p99_ratio"],
                max(r["first_flooded_ms"]),
                r["flood_images_per_s"],
                r["small_images_per_s_flooded"],
            ]
            for r in rows
        ],
    )
    print("(flooded p50/p99 leave out the first request of each flooded phase, shown apart)")
    served = [r for r in rows if "served_images_per_s" in r]
    print_table(
        "What our server's model ran in the flooded phases (both clients; from its metrics)",
        ["server", "think s", "served img/s", "mean batch", "ms per batch", "model busy %"],
        [
            [
                r["server"],
                r["small_think_s"],
                r["served_images_per_s"],
                r["mean_batch"],
                r["batch_ms"],
                100.0 * r["model_busy"],
            ]
            for r in served
        ],
    )
    default = rows[0]  # grpc-default, the small client sending without a pause: the case
    target = {
        "server": default["server"],
        "value": default["p99_ratio"],
        "target": "<= 2",
        "met": default["p99_ratio"] <= 2,
    }
    ratio = default["p99_ratio"]
    print(f"\ntarget: flooded p99 <= 2 × solo p99 on {default['server']}: {ratio:.2f}, met {target['met']}")
    write_results(
        "fairness_quick" if args.quick else "fairness",
        {
            "mode": "quick" if args.quick else "full",
            "torch_threads_per_model_process": threads,
            "glibc_malloc_tuned_every_process": allocator_tuned,
            "small_images_per_request": SMALL_IMAGES,
            "flood": {"images_per_request": FLOOD_IMAGES, "in_flight": FLOOD_IN_FLIGHT},
            "plan": {"phase_s": plan.phase_s, "passes": plan.passes, "think_s": list(plan.think_s)},
            "load_average_before": load_before,
            "rows": rows,
            "target": target,
            "load_average_after": load_average(),
            "wall_s": round(time.perf_counter() - started, 1),
        },
    )


if __name__ == "__main__":
    main()
