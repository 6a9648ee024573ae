"""Child processes the benchmarks talk to over loopback: reward servers and the HTTP baseline.

Every child is started with a bounded wait for readiness and stopped with SIGTERM (then SIGKILL after a
grace period), always by its own process id.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from services.core.server import READY_PREFIX
from trainer.children import stop


@dataclass(frozen=True)
class ServedEndpoint:
    """A running reward server: gRPC endpoint and its Prometheus port."""

    endpoint: str
    metrics_port: int


def read_line_with_prefix(proc: subprocess.Popen, prefix: str, timeout_s: float) -> str:
    """The first stdout line starting with ``prefix``; raises if the child exits or times out first."""
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(prefix):
                found.append(line.strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not found:
        stop(proc)
        raise RuntimeError(f"child {proc.args!r} did not print {prefix!r} within {timeout_s:.0f} s")
    return found[0]


@contextlib.contextmanager
def _listening_child(module: str, args: Sequence[str], timeout_s: float) -> Iterator[list[str]]:
    """``python -m MODULE ARGS`` for the duration of the block; yields its "listening on ..." line, split."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, text=True)
    try:
        yield read_line_with_prefix(proc, READY_PREFIX, timeout_s).split()
    finally:
        stop(proc)


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    """A child process spinning a pure-Python loop: one core kept busy with CPU work alone (no memory
    traffic, no shared interpreter lock), to tell plain CPU load apart from the rest of what a served
    model competes with (bench.serving)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # running before anything is timed
        yield
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def reward_server(args: Sequence[str], timeout_s: float = 300.0) -> Iterator[ServedEndpoint]:
    """``python -m bench.reward_server ARGS`` for the duration of the block."""
    with _listening_child("bench.reward_server", args, timeout_s) as words:
        _, _, endpoint, _, metrics = words
        yield ServedEndpoint(endpoint=endpoint, metrics_port=int(metrics))


@contextlib.contextmanager
def grpc_floor_server(timeout_s: float = 60.0) -> Iterator[str]:
    """``python -m bench.grpc_floor`` (gRPC alone, no reward server) for the block; yields its endpoint."""
    with _listening_child("bench.grpc_floor", (), timeout_s) as words:
        yield words[2]


@contextlib.contextmanager
def http_server(
    cmd: Sequence[str], health_url: str, env: dict[str, str], timeout_s: float = 300.0
) -> Iterator[None]:
    """A child HTTP server, ready once ``health_url`` answers 200."""
    proc = subprocess.Popen(list(cmd), env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(health_url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{health_url} not ready within {timeout_s:.0f} s")
            time.sleep(0.2)
        yield
    finally:
        stop(proc)


def scrape_batch_metrics(metrics_port: int) -> dict[str, float]:
    """Executed batches so far, from the server's /metrics: count, summed images, summed model seconds."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = {
        "reward_batch_images_count": "batches",
        "reward_batch_images_sum": "images",
        "reward_batch_seconds_sum": "model_seconds",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            out[wanted[name]] = float(line.rsplit(" ", 1)[1])
    return out
