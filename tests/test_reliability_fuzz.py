"""Fuzzing a live reward server (a `python -m services.serve` subprocess on loopback) with hypothesis.

Every generated request — corrupt and valid images of random encodings (unknown enum values too) and
sizes, huge declared dimensions and decompression bombs, random metadata JSON (objects, non-objects,
deep nesting, over-long integers), random group ids, huge prompts, and bodies that are not a message at
all — must be answered OK or INVALID_ARGUMENT / RESOURCE_EXHAUSTED with a sentence. An oracle written
from the documented limits says which of OK / INVALID_ARGUMENT each request deserves whenever the
generator knows. The process must survive, stay healthy, and give its memory back.

`make test` runs a 500-case profile; `make test-reliability` adds ≥ 10,000 cases.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from protos import reward_pb2, reward_pb2_grpc
from services.core.codec import ImageLimits
from services.core.request import RequestLimits
from tests.test_codec import png_bomb

ROOT = Path(__file__).resolve().parents[1]
SCORE = "/e2po.reward.v1.RewardService/Score"
LIMITS = RequestLimits()
IMAGE_LIMITS = ImageLimits()
FAST_CASES = 500
FULL_CASES = 10_000
FULL_RAW_CASES = 1_000
RSS_GROWTH_BOUND = 256 * 2**20
"""Allowed RSS growth of the server over a fuzz run, measured after a warm-up. Measured here, RSS
swings by ±150 MB with what the last requests held (50 MB bombs, megabyte prompts) and what the
allocator keeps; a leak of 30 KB per case would exceed it within 10,000 cases."""
PEAK_RSS_BOUND = 2 * 2**30
"""Peak RSS of the fuzzed server (idle ≈ 0.5 GB with torch loaded, requests one at a time)."""
EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


# -- a server subprocess and what we measure on it ---------------------------------------------------


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    endpoint: str
    log: Path
    metrics_endpoint: str | None = None

    def rss(self) -> int:
        return _status_kb(self.proc.pid, "VmRSS") * 1024

    def peak_rss(self) -> int:
        return _status_kb(self.proc.pid, "VmHWM") * 1024

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@contextmanager
def server_process(log: Path, *args: str, port: int = 0) -> Iterator[ServerProcess]:
    """`python -m services.serve ARGS --port PORT`, stderr to ``log`` (a pipe could fill and block it)."""
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.serve", *args, "--port", str(port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        metrics = None
        line = proc.stdout.readline()
        while line.startswith("metrics on "):
            metrics = line.removeprefix("metrics on ").strip()
            line = proc.stdout.readline()
        assert line.startswith("listening on "), (line, log.read_text())
        yield ServerProcess(proc, line.removeprefix("listening on ").strip(), log, metrics)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stdout.close()


def health_status(endpoint: str) -> int:
    with grpc.insecure_channel(endpoint) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def report(name: str, **numbers: object) -> None:
    """Numbers quoted in docs/reliability.md: printed, and appended to $E2PO_RELIABILITY_REPORT if set."""
    line = json.dumps({"test": name, **numbers})
    print(line)
    path = os.environ.get("E2PO_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


# -- request generators with an oracle ----------------------------------------------------------------

VALID, INVALID, EITHER = "valid", "invalid", "either"


@dataclass
class Case:
    """A request and what it deserves: VALID (must be OK), INVALID (must be INVALID_ARGUMENT) or EITHER."""

    request: reward_pb2.ScoreRequest
    verdict: str

    def __repr__(self) -> str:  # a shrunk failure prints this, not megabytes of prompt
        parts = [
            f"enc={s.image.encoding} {s.image.height}x{s.image.width} data={len(s.image.data)}B "
            f"prompt={len(s.prompt)}c meta={s.metadata_json[:60]!r}({len(s.metadata_json)}c) "
            f"gid={len(s.group_id)}c"
            for s in self.request.samples[:6]
        ]
        return f"Case({self.verdict}, {len(self.request.samples)} samples: " + " | ".join(parts) + ")"


def _encode(array: np.ndarray, fmt: str, **kw: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kw)
    return buffer.getvalue()


@cache
def _corpus() -> tuple[tuple[int, bytes], ...]:
    """Small valid PNG/JPEG files of assorted modes (encoding, bytes)."""
    rng = np.random.default_rng(0)
    png, jpeg = reward_pb2.IMAGE_ENCODING_PNG, reward_pb2.IMAGE_ENCODING_JPEG
    rgb = rng.integers(0, 256, size=(13, 9, 3), dtype=np.uint8)
    files = [
        (png, _encode(rgb, "PNG")),
        (png, _encode(rgb[:, :, 0], "PNG")),  # greyscale
        (png, _encode(np.dstack([rgb, rgb[:, :, :1]]), "PNG")),  # RGBA
        (png, _palette_png(rgb)),
        (png, _encode(np.zeros((1, 1, 3), np.uint8), "PNG")),
        (jpeg, _encode(rgb, "JPEG", quality=90)),
        (jpeg, _encode(rgb, "JPEG", progressive=True)),
        (jpeg, _encode(rgb[:, :, 0], "JPEG")),
    ]
    return tuple(files)


def _palette_png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width×height but whose pixel data is a few bytes: refused (or
    failing) at the header or at decode, never allocated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def jpeg_with_declared_size(height: int, width: int) -> bytes:
    """A small JPEG whose SOF header is patched to declare height×width."""
    data = bytearray(_corpus()[5][1])
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@cache
def at_limit_bomb() -> bytes:
    """A ~50 KB PNG that really decodes to the per-image maximum (4096×4096, 50 MB)."""
    return png_bomb(4096, 4096)


def _size_ok(height: int, width: int) -> bool:
    return (
        0 < height <= IMAGE_LIMITS.max_side
        and 0 < width <= IMAGE_LIMITS.max_side
        and height * width <= IMAGE_LIMITS.max_pixels
    )


sides = st.one_of(
    st.integers(0, 24),
    st.sampled_from([0, 1, 4096, 4097, 16384, 16385, 65535, 2**31 - 1, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)


@st.composite
def raw_images(draw, *, clean: bool = False) -> tuple[reward_pb2.Image, str]:
    if clean or draw(st.booleans()):  # well-formed
        height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
        fill = draw(st.integers(0, 255))
        data = bytes([fill]) * (height * width * 3)
        return reward_pb2.Image(height=height, width=width, data=data), VALID
    height, width = draw(sides), draw(sides)
    data = draw(st.binary(max_size=2048))
    ok = _size_ok(height, width) and len(data) == height * width * 3
    return reward_pb2.Image(height=height, width=width, data=data), VALID if ok else INVALID


@st.composite
def compressed_images(draw, *, clean: bool = False) -> tuple[reward_pb2.Image, str]:
    encoding, data = draw(st.sampled_from(_corpus()))
    kinds = ["intact"] if clean else ["intact", "mutated", "truncated", "wrong_encoding", "declared"]
    kind = draw(st.sampled_from(kinds))
    if kind == "intact":
        return reward_pb2.Image(encoding=encoding, data=data), VALID
    if kind == "wrong_encoding":  # PNG bytes labelled JPEG and vice versa
        other = (
            reward_pb2.IMAGE_ENCODING_JPEG
            if encoding == reward_pb2.IMAGE_ENCODING_PNG
            else (reward_pb2.IMAGE_ENCODING_PNG)
        )
        return reward_pb2.Image(encoding=other, data=data), INVALID
    if kind == "declared":  # declared size beside the file's own
        height, width = draw(sides), draw(sides)
        actual = Image.open(io.BytesIO(data)).size[::-1]
        ok = (height == 0 or width == 0) or (height, width) == actual
        return reward_pb2.Image(encoding=encoding, data=data, height=height, width=width), (
            VALID if ok else INVALID
        )
    mutable = bytearray(data)
    if kind == "truncated":
        cut = draw(st.integers(0, len(mutable) - 1))
        return reward_pb2.Image(encoding=encoding, data=bytes(mutable[:cut])), EITHER
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(mutable) - 1))
        if draw(st.booleans()):
            mutable[position] = draw(st.integers(0, 255))
        else:
            mutable[position:position] = draw(st.binary(min_size=1, max_size=16))
    return reward_pb2.Image(encoding=encoding, data=bytes(mutable)), EITHER


@st.composite
def bomb_images(draw) -> tuple[reward_pb2.Image, str]:
    # A bomb at the limit really decodes 50 MB and is scored: rare, or the run would take hours.
    if draw(st.integers(0, 149)) == 0:
        return reward_pb2.Image(encoding=reward_pb2.IMAGE_ENCODING_PNG, data=at_limit_bomb()), VALID
    kind = draw(st.sampled_from(["png_header", "jpeg_header"]))
    height, width = draw(sides.filter(lambda s: 0 < s < 2**31)), draw(sides.filter(lambda s: 0 < s < 2**31))
    if kind == "png_header":
        image = reward_pb2.Image(encoding=reward_pb2.IMAGE_ENCODING_PNG, data=png_header_only(width, height))
    else:
        height, width = min(height, 65535), min(width, 65535)
        image = reward_pb2.Image(
            encoding=reward_pb2.IMAGE_ENCODING_JPEG, data=jpeg_with_declared_size(height, width)
        )
    # Over the limits: refused from the header. Within them the pixel data is far too short, and
    # Pillow may pad it rather than fail, so either answer is fair — but never a crash.
    return image, EITHER if _size_ok(height, width) else INVALID


@st.composite
def odd_encodings(draw) -> tuple[reward_pb2.Image, str]:
    """Values outside the enum (proto3 enums are open: any int32 reaches the server). 0 is RAW_RGB8."""
    known = set(reward_pb2.ImageEncoding.values())
    encoding = draw(st.integers(-(2**31), 2**31 - 1).filter(lambda e: e not in known))
    image = reward_pb2.Image(encoding=encoding, height=2, width=2, data=draw(st.binary(max_size=64)))
    return image, INVALID


images = st.one_of(raw_images(), compressed_images(), bomb_images(), odd_encodings())
clean_images = st.one_of(raw_images(clean=True), compressed_images(clean=True))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@st.composite
def metadata(draw, *, clean: bool = False) -> tuple[str, str]:
    kinds = ["none", "object"] if clean else ["none", "object", "value", "text", "nested", "bigint", "huge"]
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return "", VALID
    if kind == "object":
        return json.dumps(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=6))), VALID
    if kind == "value":  # valid JSON, not an object
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return json.dumps(value), INVALID
    if kind == "text":
        text = draw(st.text(max_size=200))
        try:
            return text, VALID if text == "" or isinstance(json.loads(text), dict) else INVALID
        except (ValueError, RecursionError):
            return text, INVALID
    if kind == "nested":  # deep nesting, within or over the size limit
        depth = draw(st.integers(1, 40_000))
        inner = '{"a":' * depth + "1" + "}" * depth
        if len(inner) > LIMITS.max_metadata_chars:
            return inner, INVALID
        return inner, VALID if depth < 500 else EITHER  # Python's parser may hit its recursion limit
    if kind == "bigint":  # more digits than Python converts (ValueError, not JSONDecodeError)
        digits = draw(st.integers(4_000, 60_000))
        return '{"n": ' + "7" * digits + "}", VALID if digits <= 4300 else INVALID
    return '{"x": "' + "y" * draw(st.integers(LIMITS.max_metadata_chars, 200_000)) + '"}', INVALID


@st.composite
def prompts(draw, *, clean: bool = False) -> tuple[str, str]:
    if not clean and draw(st.integers(0, 4)) == 0:  # huge, around and far past the limit
        length = draw(st.one_of(st.integers(4_000, 4_200), st.integers(4_200, 1_000_000)))
        char = draw(st.characters(codec="utf-8"))
        return char * length, VALID if length <= LIMITS.max_prompt_chars else INVALID
    return draw(st.text(max_size=80)), VALID


@st.composite
def group_ids(draw, *, clean: bool = False) -> tuple[str, str]:
    if clean:
        return draw(st.one_of(st.just(""), st.text(max_size=12))), VALID
    gid = draw(st.one_of(st.just(""), st.text(max_size=12), st.text(min_size=250, max_size=300)))
    return gid, VALID if len(gid) <= LIMITS.max_group_id_chars else INVALID


@st.composite
def samples(draw, *, clean: bool) -> tuple[reward_pb2.Sample, str]:
    """One sample; ``clean`` draws only well-formed parts (so whole requests get scored too)."""
    verdicts = []
    sample = reward_pb2.Sample()
    if clean or draw(st.integers(0, 19)):  # sometimes no image at all
        image, verdict = draw(clean_images if clean else images)
        sample.image.CopyFrom(image)
        verdicts.append(verdict)
    else:
        verdicts.append(INVALID)
    parts = ((prompts, "prompt"), (metadata, "metadata_json"), (group_ids, "group_id"))
    for strategy, attr in ((s(clean=clean), attr) for s, attr in parts):
        value, verdict = draw(strategy)
        setattr(sample, attr, value)
        verdicts.append(verdict)
    return sample, _combine(verdicts)


def _combine(verdicts: list[str]) -> str:
    if INVALID in verdicts:
        return INVALID
    return EITHER if EITHER in verdicts else VALID


@st.composite
def cases(draw) -> Case:
    if draw(st.integers(0, 49)) == 0:  # more samples than a request may carry (cheap ones)
        count = draw(st.integers(LIMITS.max_images_per_request + 1, LIMITS.max_images_per_request + 40))
        tiny = reward_pb2.Sample(image=reward_pb2.Image(height=1, width=1, data=b"\0\0\0"))
        return Case(reward_pb2.ScoreRequest(samples=[tiny] * count), INVALID)
    # Half the requests are well-formed except perhaps one sample; the rest are anything.
    clean = draw(st.booleans())
    drawn = draw(st.lists(samples(clean=clean), max_size=6))
    if clean and drawn and draw(st.booleans()):
        drawn[draw(st.integers(0, len(drawn) - 1))] = draw(samples(clean=False))
    request = reward_pb2.ScoreRequest(samples=[s for s, _ in drawn])
    verdict = _combine([v for _, v in drawn]) if drawn else INVALID
    bombs = sum(s.image.data == at_limit_bomb() for s in request.samples)
    if bombs * IMAGE_LIMITS.max_pixels > LIMITS.max_pixels_per_request:
        verdict = INVALID  # over the request's decoded-pixel budget, whatever else it holds
    if len(request.SerializeToString()) > LIMITS.max_request_bytes:
        verdict = EITHER  # gRPC refuses it as RESOURCE_EXHAUSTED before the handler
    return Case(request, verdict)


# -- running cases ------------------------------------------------------------------------------------


@dataclass
class Tally:
    codes: Counter = field(default_factory=Counter)
    cases: int = 0

    def check(self, case_verdict: str, code: grpc.StatusCode, details: str, what: object) -> None:
        self.cases += 1
        self.codes[code.name] += 1
        assert code in EXPECTED, (code, details, what)
        if code != grpc.StatusCode.OK:
            assert details and details.strip(), (code, what)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return  # queue, quota or memory: allowed for any request
        if case_verdict == VALID:
            assert code == grpc.StatusCode.OK, (details, what)
        elif case_verdict == INVALID:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (details, what)


def fuzz_requests(endpoint: str, num_cases: int, *, derandomize: bool) -> Tally:
    tally = Tally()
    options = [("grpc.max_send_message_length", 256 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]
    with grpc.insecure_channel(endpoint, options=options) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)

        @settings(
            max_examples=num_cases,
            deadline=None,
            derandomize=derandomize,
            print_blob=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=cases())
        def one(case: Case) -> None:
            try:
                response = stub.Score(case.request, timeout=60)
            except grpc.RpcError as err:
                tally.check(case.verdict, err.code(), err.details(), repr(case))
                return
            tally.check(case.verdict, grpc.StatusCode.OK, "", repr(case))
            assert len(response.scores) == len(case.request.samples)
            for scores in response.scores:
                assert all(math.isfinite(v) for v in scores.values.values())

        one()
    return tally


def fuzz_raw_bodies(endpoint: str, num_cases: int, *, derandomize: bool) -> Tally:
    """Bodies that are random bytes or a valid request with bytes flipped: never UNKNOWN or INTERNAL."""
    tally = Tally()
    valid = reward_pb2.ScoreRequest(
        samples=[reward_pb2.Sample(image=reward_pb2.Image(height=2, width=2, data=b"\1" * 12), prompt="p")]
    ).SerializeToString()
    with grpc.insecure_channel(endpoint) as channel:
        call = channel.unary_unary(SCORE)  # bytes in, bytes out: no client-side (de)serialisation

        @settings(
            max_examples=num_cases,
            deadline=None,
            derandomize=derandomize,
            print_blob=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            body=st.one_of(
                st.binary(max_size=512),
                st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), min_size=1).map(
                    lambda edits: _flip(valid, edits)
                ),
            )
        )
        def one(body: bytes) -> None:
            try:
                call(body, timeout=30)
            except grpc.RpcError as err:
                tally.check(EITHER, err.code(), err.details(), body[:80])
                return
            tally.check(EITHER, grpc.StatusCode.OK, "", body[:80])

        one()
    return tally


def _flip(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    mutable = bytearray(data)
    for position, value in edits:
        mutable[position] = value
    return bytes(mutable)


def warm_up(endpoint: str) -> None:
    """Reach steady state before the baseline RSS: every decoder, thread and buffer used once."""
    fuzz_requests(endpoint, 60, derandomize=True)
    with grpc.insecure_channel(endpoint) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        bomb = reward_pb2.Sample(
            image=reward_pb2.Image(encoding=reward_pb2.IMAGE_ENCODING_PNG, data=at_limit_bomb())
        )
        stub.Score(reward_pb2.ScoreRequest(samples=[bomb] * 2), timeout=60)


def run_fuzz(tmp_path: Path, name: str, num_cases: int, num_raw: int, *, derandomize: bool) -> None:
    with server_process(tmp_path / "server.log", "compressibility", "--log-level", "WARNING") as server:
        started = time.perf_counter()
        warm_up(server.endpoint)
        rss_before = server.rss()
        tally = fuzz_requests(server.endpoint, num_cases, derandomize=derandomize)
        raw = fuzz_raw_bodies(server.endpoint, num_raw, derandomize=derandomize)
        rss_after, peak = server.rss(), server.peak_rss()
        assert server.proc.poll() is None, server.stderr()
        assert health_status(server.endpoint) == health_pb2.HealthCheckResponse.SERVING
        assert "Traceback" not in server.stderr(), server.stderr()
        seconds = time.perf_counter() - started
    total = tally.cases + raw.cases
    assert tally.cases >= num_cases and raw.cases >= num_raw
    assert rss_after - rss_before <= RSS_GROWTH_BOUND, (rss_before, rss_after)
    assert peak <= PEAK_RSS_BOUND, peak
    report(
        name,
        cases=total,
        request_cases=tally.cases,
        raw_body_cases=raw.cases,
        codes=dict(tally.codes + raw.codes),
        rss_before_mb=round(rss_before / 2**20, 1),
        rss_after_mb=round(rss_after / 2**20, 1),
        peak_rss_mb=round(peak / 2**20, 1),
        seconds=round(seconds, 1),
    )


def test_fuzzed_requests_fast_profile(tmp_path: Path) -> None:
    run_fuzz(tmp_path, "fuzz-fast", FAST_CASES, 100, derandomize=True)


@pytest.mark.reliability
@pytest.mark.timeout(1800)  # ≈ 20 ms a case on 2 busy cores, and a few real 50 MB bombs
def test_fuzzed_requests_full(tmp_path: Path) -> None:
    run_fuzz(tmp_path, "fuzz-full", FULL_CASES, FULL_RAW_CASES, derandomize=False)
