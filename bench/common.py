"""Helpers every benchmark shares: timing statistics, the machine description, tables and JSON results."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = Path(__file__).resolve().parent / "configs"
THREADS_ENV = "BENCH_TORCH_THREADS"
"""Intra-op threads of every process that runs a model in a benchmark; children inherit it."""


def model_config(name: str) -> dict[str, Any]:
    """An architecture config from ``bench/configs`` (a hub repository's), without its ``_`` notes."""
    raw = json.loads((CONFIGS / name).read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def use_torch_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``num_threads`` (or the inherited setting) and export it to children.

    The serving benchmarks default to one thread per model process: on a small machine shared with other
    jobs, a 2-thread OpenMP team spins at every barrier while another process holds the second core, which
    made batch-1 calls ~15× slower than with one thread (measured here). All systems get the same setting.
    """
    if num_threads is None:
        num_threads = int(os.environ.get(THREADS_ENV, torch.get_num_threads()))
    torch.set_num_threads(num_threads)
    os.environ[THREADS_ENV] = str(num_threads)
    return num_threads


def use_server_allocator() -> bool:
    """Give this process the glibc malloc settings our reward server runs with.

    They make the model itself faster too (fewer page faults for activations; measured ~10 % on the
    serving benchmark's scorer), so every process of a benchmark gets them — in-process scoring, clients,
    our server and the HTTP baseline alike — and the comparisons stay between designs.
    """
    from services.core.allocator import keep_freed_memory
    from services.core.server import ServerConfig

    trim_threshold = ServerConfig().malloc_trim_threshold_bytes
    return trim_threshold is not None and keep_freed_memory(trim_threshold)


def percentile_ms(seconds: Sequence[float], q: float) -> float | None:
    """The q-th percentile of ``seconds`` in milliseconds (None when there is no sample)."""
    return float(np.percentile(np.asarray(seconds) * 1000.0, q)) if len(seconds) else None


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: how busy the machine was around a measurement."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> None:
    """A plain-text table: one header line, one line per row."""
    cells = [[fmt(v, digits) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def write_results(name: str, payload: dict[str, Any], directory: Path = RESULTS) -> Path:
    """Write ``<directory>/<name>.json`` (``bench/results`` by default) with the run's context; return it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    document = {
        "benchmark": name,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": _git_commit(),
        "git_uncommitted_changes": _git_uncommitted(),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    return out.stdout if out.returncode == 0 else None


def _git_commit() -> str | None:
    return (_git("rev-parse", "--short", "HEAD") or "").strip() or None


def _git_uncommitted() -> list[str] | None:
    """Tracked files that differ from ``git_commit`` (results aside): a run of uncommitted code says so."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    return None if status is None else [line[3:] for line in status.splitlines()]


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    seconds: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
