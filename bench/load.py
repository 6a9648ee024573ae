"""Closed-loop load: N clients, each sending one request at a time, measured over a common window
(:mod:`bench.window`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.common import percentile_ms
from bench.http_pickle_baseline import HttpClient
from bench.processes import scrape_batch_metrics
from bench.window import Record, Window, WindowConfig
from services.client import GrpcRewardClient, RewardError

PROMPT = "a photo of a red apple on a wooden table"


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool repeats of one cell: rate over the summed windows, percentiles over all their requests."""
    latencies = [x for run in runs for x in run.get("latencies_s", [])]
    seconds = sum(run["seconds"] for run in runs)
    images = sum(run["images"] for run in runs)
    out = {k: v for k, v in runs[0].items() if k in ("clients", "request_size", "batch_size")}
    out.update(
        {
            "seconds": round(seconds, 3),
            "images": images,
            "requests": sum(run["requests"] for run in runs),
            "errors": sum(run.get("errors", 0) for run in runs),
            "images_per_s": images / seconds if seconds > 0 else None,
            "images_per_s_each_pass": [run["images_per_s"] for run in runs],
            "p50_ms": percentile_ms(latencies, 50),
            "p99_ms": percentile_ms(latencies, 99),
        }
    )
    batches = [(run["mean_batch"], run.get("batches", 1)) for run in runs if run.get("mean_batch")]
    if batches:
        out["mean_batch"] = sum(m * n for m, n in batches) / sum(n for _, n in batches)
    busy = [run for run in runs if run.get("model_images_per_s")]
    if busy:
        model_seconds = sum(run["model_busy"] * run["seconds"] for run in busy)
        out["model_busy"] = model_seconds / sum(run["seconds"] for run in busy)
        out["model_images_per_s"] = sum(run["mean_batch"] * run["batches"] for run in busy) / model_seconds
    return out


def pick(pool: np.ndarray, cursor: int, count: int) -> np.ndarray:
    """``count`` images from the pool starting at ``cursor`` (wrapping)."""
    index = (np.arange(count) + cursor) % len(pool)
    return pool[index]


async def grpc_cell(
    endpoint: str,
    *,
    clients: int,
    request_size: int,
    pool: np.ndarray,
    window: WindowConfig,
    metrics_port: int | None = None,
    name: str = "bench",
) -> dict[str, Any]:
    """N RewardClients against ``endpoint``; adds the mean executed batch size when metrics are given."""
    win = Window(num_clients=clients, config=window)
    rcs = [GrpcRewardClient(endpoint, client_name=f"{name}-{i}", timeout_s=600) for i in range(clients)]

    async def run(i: int) -> None:
        cursor = i * request_size
        while not win.closed:
            images = pick(pool, cursor, request_size)
            cursor += clients * request_size
            start = time.perf_counter()
            try:
                await rcs[i].score(images, PROMPT)
                ok = True
            except RewardError:
                ok = False
            win.record(Record(client=i, start=start, end=time.perf_counter(), images=request_size, ok=ok))

    async def watch() -> dict[str, float]:
        """Executed-batch metrics accumulated between window open and close."""
        assert metrics_port is not None
        while win.t_open is None and not win.closed:
            await asyncio.sleep(0.01)
        first = await asyncio.to_thread(scrape_batch_metrics, metrics_port)
        while not win.closed:
            await asyncio.sleep(0.01)
        last = await asyncio.to_thread(scrape_batch_metrics, metrics_port)
        return {key: last[key] - first[key] for key in last}

    try:
        tasks = [asyncio.create_task(run(i)) for i in range(clients)]
        watcher = asyncio.create_task(watch()) if metrics_port is not None else None
        while not win.closed:
            await asyncio.sleep(0.01)
        # Requests still in flight are answered after the window; cancel them rather than wait.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        deltas = await watcher if watcher is not None else None
    finally:
        for rc in rcs:
            await rc.close()
    out = {"clients": clients, "request_size": request_size, **win.summary()}
    if deltas is not None and deltas["batches"] > 0:
        out["mean_batch"] = deltas["images"] / deltas["batches"]
        out["batches"] = int(deltas["batches"])
        # How busy the model was inside the window, and its speed while busy.
        out["model_busy"] = deltas["model_seconds"] / out["seconds"] if out["seconds"] else None
        out["model_images_per_s"] = (
            deltas["images"] / deltas["model_seconds"] if deltas["model_seconds"] else None
        )
    return out


def http_cell(
    url: str, *, clients: int, request_size: int, pool: np.ndarray, window: WindowConfig
) -> dict[str, Any]:
    """N competitor clients in threads; each request is one model call of its own size."""
    win = Window(num_clients=clients, config=window)

    def run(i: int) -> None:
        client = HttpClient(url)
        cursor = i * request_size
        try:
            while not win.closed:
                images = pick(pool, cursor, request_size)
                cursor += clients * request_size
                start = time.perf_counter()
                try:
                    client.score(images, [PROMPT] * request_size)
                    ok = True
                except OSError:
                    ok = False
                win.record(Record(client=i, start=start, end=time.perf_counter(), images=request_size, ok=ok))
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=4 * window.max_s)
    out = {"clients": clients, "request_size": request_size, **win.summary()}
    out["mean_batch"] = float(request_size)  # no cross-request batching: one model call per request
    return out


def in_process_cell(score: Callable[[int], None], batch_size: int, duration_s: float) -> dict[str, Any]:
    """Call ``score(batch_size)`` back to back for ``duration_s`` (after one warm-up call)."""
    score(batch_size)
    latencies = []
    started = time.perf_counter()
    while time.perf_counter() - started < duration_s or len(latencies) < 3:
        t0 = time.perf_counter()
        score(batch_size)
        latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - started
    return {
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "images": batch_size * len(latencies),
        "requests": len(latencies),
        "images_per_s": batch_size * len(latencies) / seconds,
        "latencies_s": latencies,
    }
