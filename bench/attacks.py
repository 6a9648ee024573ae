"""Hostile requests against a served reward model while a well-behaved client keeps scoring.

    python -m bench.attacks [--victim-seconds S] [--repeats N] [--quick]

One ``python -m services.serve compressibility`` child with token auth and default limits. A victim
sends one 64×64 image every 50 ms with its valid token; its latencies are measured quiet, then while
each attack runs (each attack request sent every 250 ms, at least ``--repeats`` times and for
``--victim-seconds``, from a separate process). Per attack: the
status and time of the attacker's answers, the victim's p50/p99 against its quiet p99, and the server's
peak resident memory (sampled every 10 ms from /proc) above its level before the attacks.

The attacks are those of the hardening probe (a body of empty samples, 1×1 raw images, unknown fields,
no token) and more: a body at the default 64 MB limit, ScoreStreams that send a part and stall, and
PNG decompression bombs. Results: ``bench/results/attacks.json`` and a table (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import load_average, percentile_ms, print_table, write_results
from bench.processes import read_line_with_prefix, stop
from protos import reward_pb2
from services.core.codec import PNG, encode_raw
from services.core.metadata_keys import bearer
from services.core.server import READY_PREFIX
from services.core.wire import SCORE_METHOD, SCORE_STREAM_METHOD, varint

TOKEN = "bench-attacks-token-0123456789abcdef"
VICTIM_INTERVAL_S = 0.05
ATTACK_INTERVAL_S = 0.25
"""Pause between two sends of an attack: each is one request's worth of harm, as in the probe (a
flood from the same 2 cores would measure the machine's CPU, not the server)."""


def png_bomb(side: int) -> bytes:
    """A valid PNG of a few KB whose header declares a side×side all-zero RGB canvas."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * side)
    data = b"".join(compressor.compress(row * 64) for _ in range(side // 64)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _one_sample(image: reward_pb2.Image) -> bytes:
    return reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image=image, prompt="p")]).SerializeToString()


@dataclass
class Attack:
    """One hostile request: sent as a Score body, or (``stream``) as a ScoreStream of one part that stalls."""

    name: str
    body: bytes
    token: str | None = TOKEN
    stream: bool = False
    expected: frozenset[str] = frozenset({"INVALID_ARGUMENT"})
    """The statuses a hardened server answers it with."""
    concurrent: int = 1
    """Requests sent at once per repeat (streams: held open together)."""


def attacks(quick: bool) -> list[Attack]:
    scale = 10 if quick else 1
    raw_1x1 = _one_sample(encode_raw(np.zeros((1, 1, 3), np.uint8)))[:-3]  # sample without its prompt
    bomb = _one_sample(reward_pb2.Image(encoding=PNG, data=png_bomb(8192)))  # 67 MP declared, 16.8 allowed
    stalled = b"\x7a" + varint(47_000_000 // scale) + bytes(47_000_000 // scale)
    closed = frozenset({"DEADLINE_EXCEEDED"})
    return [
        Attack(
            "1M empty samples, no token",
            b"\x0a\x00" * (1_000_000 // scale),
            token=None,
            expected=frozenset({"UNAUTHENTICATED"}),
        ),
        Attack("4M empty samples", b"\x0a\x00" * (4_000_000 // scale)),
        Attack("100k 1x1 raw images", raw_1x1 * (100_000 // scale)),
        Attack("1M unknown varint fields", b"\x10\x01" * (1_000_000 // scale)),
        Attack("60 MB unknown field", b"\x7a" + varint(60_000_000 // scale) + bytes(60_000_000 // scale)),
        Attack("8 streams: 47 MB part, stall", stalled, stream=True, concurrent=8, expected=closed),
        Attack(
            "100 idle streams",
            _one_sample(encode_raw(np.zeros((4, 4, 3), np.uint8))),
            stream=True,
            concurrent=100,
            expected=closed | {"RESOURCE_EXHAUSTED"},
        ),
        Attack("16 PNG bombs (8192² declared)", bomb, concurrent=16),
    ]


class RssSampler:
    """Peak resident set size of one process, sampled every 10 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self._path = Path(f"/proc/{pid}/status")
        self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def current(self) -> int:
        for line in self._path.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def reset(self) -> None:
        self.peak = self.current()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, self.current())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Victim:
    """Scores one image every 50 ms with a valid token, recording each latency, until stopped."""

    channel: grpc.aio.Channel
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        score = self.channel.unary_unary(SCORE_METHOD)
        body = _one_sample(encode_raw(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)))
        while not stop.is_set():
            started = time.perf_counter()
            try:
                await score(body, metadata=bearer(TOKEN), timeout=30)
                self.latencies.append(time.perf_counter() - started)
            except grpc.aio.AioRpcError as exc:
                self.errors.append(exc.code().name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    stop.wait(), max(0.0, VICTIM_INTERVAL_S - (time.perf_counter() - started))
                )

    async def run_for(self, seconds: float) -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        await self.run(stop)


async def _send(channel: grpc.aio.Channel, attack: Attack) -> tuple[str, float]:
    started = time.perf_counter()
    try:
        if attack.stream:
            call = channel.stream_unary(SCORE_STREAM_METHOD)(metadata=bearer(attack.token), timeout=120)
            await call.write(attack.body)
            await call  # never sends another part: the server's idle timeout or limits end it
        else:
            await channel.unary_unary(SCORE_METHOD)(attack.body, metadata=bearer(attack.token), timeout=120)
        code = "OK"
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    return code, time.perf_counter() - started


def _attacker(
    endpoint: str, quick: bool, index: int, repeats: int, min_seconds: float
) -> list[tuple[str, float]]:
    """Sends the attack ``repeats`` times and for at least ``min_seconds``, 250 ms apart. Runs in its
    own process, so that sending 60 MB costs the victim's client nothing."""

    async def main() -> list[tuple[str, float]]:
        attack = attacks(quick)[index]
        answers: list[tuple[str, float]] = []
        options = [("grpc.max_send_message_length", -1)]
        end = time.perf_counter() + min_seconds
        async with grpc.aio.insecure_channel(endpoint, options=options) as channel:
            while len(answers) < repeats * attack.concurrent or time.perf_counter() < end:
                answers += await asyncio.gather(*(_send(channel, attack) for _ in range(attack.concurrent)))
                await asyncio.sleep(ATTACK_INTERVAL_S)
        return answers

    return asyncio.run(main())


async def _attack_window(
    endpoint: str,
    rss: RssSampler,
    pool: ProcessPoolExecutor,
    quick: bool,
    index: int,
    repeats: int,
    seconds: float,
) -> dict[str, Any]:
    attack = attacks(quick)[index]
    async with grpc.aio.insecure_channel(endpoint) as victim_channel:
        victim = Victim(victim_channel)
        before = rss.current()
        rss.reset()
        stop = asyncio.Event()
        victim_task = asyncio.create_task(victim.run(stop))
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        answers = await loop.run_in_executor(pool, _attacker, endpoint, quick, index, repeats, seconds)
        await asyncio.sleep(0.3)
        stop.set()
        await victim_task
        await asyncio.sleep(0.5)
        after = rss.current()
    codes = sorted({code for code, _ in answers})
    return {
        "attack": attack.name,
        "body_bytes": len(attack.body),
        "requests": len(answers),
        "answers": codes,
        "as_expected": set(codes) <= attack.expected,
        "answer_ms_max": max(t for _, t in answers) * 1000,
        "victim_requests": len(victim.latencies),
        "victim_errors": victim.errors,
        "victim_p50_ms": percentile_ms(victim.latencies, 50),
        "victim_p99_ms": percentile_ms(victim.latencies, 99),
        "victim_max_ms": max(victim.latencies) * 1000 if victim.latencies else None,
        "rss_before_mb": before / 2**20,
        "rss_peak_over_before_mb": (rss.peak - before) / 2**20,
        "rss_after_over_before_mb": (after - before) / 2**20,
    }


@contextlib.contextmanager
def served(token_file: Path, extra: list[str]) -> Iterator[tuple[str, int]]:
    cmd = [
        sys.executable,
        "-m",
        "services.serve",
        "compressibility",
        "--port",
        "0",
        "--token-file",
        str(token_file),
        "--log-level",
        "ERROR",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        words = read_line_with_prefix(proc, READY_PREFIX, 120).split()
        yield words[2], proc.pid
    finally:
        stop(proc)


async def measure(endpoint: str, pid: int, *, quick: bool, repeats: int, victim_s: float) -> dict[str, Any]:
    rss = RssSampler(pid)
    try:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            await Victim(channel).run_for(1.0)  # warm-up
            quiet = Victim(channel)
            await quiet.run_for(victim_s)
        quiet_row = {
            "victim_p50_ms": percentile_ms(quiet.latencies, 50),
            "victim_p99_ms": percentile_ms(quiet.latencies, 99),
            "victim_requests": len(quiet.latencies),
            "rss_mb": rss.current() / 2**20,
        }
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(int).result()  # the attacker process is up before anything is timed
            rows = [
                await _attack_window(endpoint, rss, pool, quick, index, repeats, victim_s)
                for index in range(len(attacks(quick)))
            ]
    finally:
        rss.close()
    for row in rows:
        row["victim_p99_over_quiet"] = row["victim_p99_ms"] / quiet_row["victim_p99_ms"]
    return {"quiet": quiet_row, "attacks": rows}


def run(*, quick: bool, repeats: int, victim_s: float, server_args: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "tokens"
        token_file.write_text(f"bench:{TOKEN}\n")
        with served(token_file, server_args) as (endpoint, pid):
            return asyncio.run(measure(endpoint, pid, quick=quick, repeats=repeats, victim_s=victim_s))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.attacks", description=__doc__.splitlines()[0])
    p.add_argument(
        "--victim-seconds", type=float, default=4.0, help="quiet victim run; each attack lasts at least this"
    )
    p.add_argument("--repeats", type=int, default=3, help="least times each attack is sent")
    p.add_argument("--quick", action="store_true", help="attack bodies a tenth as large (tests)")
    p.add_argument("--stream-idle-timeout-s", type=float, default=2.0)
    args = p.parse_args(argv)
    started = time.perf_counter()
    result = run(
        quick=args.quick,
        repeats=args.repeats,
        victim_s=args.victim_seconds,
        server_args=["--stream-idle-timeout-s", str(args.stream_idle_timeout_s)],
    )
    quiet = result["quiet"]
    print(f"quiet victim: p50 {quiet['victim_p50_ms']:.1f} ms, p99 {quiet['victim_p99_ms']:.1f} ms")
    print_table(
        "attacks (victim: one 64x64 image every 50 ms, valid token)",
        ["attack", "MB", "answers", "answer ms", "victim p99 ms", "x quiet", "RSS peak +MB", "RSS after +MB"],
        [
            [
                r["attack"],
                r["body_bytes"] / 1e6,
                ",".join(r["answers"]),
                r["answer_ms_max"],
                r["victim_p99_ms"],
                r["victim_p99_over_quiet"],
                r["rss_peak_over_before_mb"],
                r["rss_after_over_before_mb"],
            ]
            for r in result["attacks"]
        ],
    )
    write_results(
        "attacks",
        {
            "config": vars(args),
            "load_average": load_average(),
            "seconds": time.perf_counter() - started,
            "pid": os.getpid(),
            **result,
        },
    )


if __name__ == "__main__":
    main()
