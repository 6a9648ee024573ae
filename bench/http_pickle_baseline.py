"""The competitor: a reward model behind Flask + gunicorn, pickled request bodies, JPEG images.

This models the serving pattern common in RL-for-diffusion code today, written with its best settings so
the comparison is fair:

* server: one gunicorn ``gthread`` worker (one model copy per device, as our server) with several threads
  so that reading and decoding the next requests overlaps the model; HTTP keep-alive; the model call is
  serialised by a lock because concurrent forwards on one device only oversubscribe it;
* body: ``pickle.dumps({"images": [JPEG bytes, ...], "prompts": [...]})`` — pickle appears only here,
  because it is what the competitor does; **loading a pickle from the network executes arbitrary code**,
  which is why the product's wire format is protobuf and never pickle;
* client: a ``requests.Session`` per client (keep-alive), images JPEG-encoded at quality 75 by Pillow;
* the worker runs with the glibc malloc settings our server uses (:mod:`services.core.allocator`).

It has no cross-request batching: each request is one model call of its own size.

    gunicorn --worker-class gthread --threads 4 bench.http_pickle_baseline:app   (BENCH_HTTP_SCORER=clip|null)
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import requests
import torch
from flask import Flask, Response, jsonify, request
from PIL import Image

from bench.common import use_server_allocator, use_torch_threads
from bench.processes import http_server
from services.core.scorer import ScoreBatch, Scorer

JPEG_QUALITY = 75
THREADS = 4
"""gthread threads: enough to keep a decoded request waiting whenever the model finishes one."""
SCORER_ENV = "BENCH_HTTP_SCORER"

# decode_request wraps Pillow's read-only arrays without copying (the tensors are only read); torch warns
# about every such array, which would flood the benchmark's output.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

app = Flask(__name__)
_lock = threading.Lock()
_scorer: Scorer | None = None


def _load_scorer() -> Scorer:
    from bench.scorers import NullScorer, bench_clip_scorer

    use_torch_threads()
    return bench_clip_scorer() if os.environ.get(SCORER_ENV, "clip") == "clip" else NullScorer()


def encode_request(images: np.ndarray, prompts: Sequence[str]) -> bytes:
    """Client side: (B, H, W, 3) uint8 → pickled dict of JPEG files."""
    files = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        files.append(buffer.getvalue())
    return pickle.dumps({"images": files, "prompts": list(prompts)}, protocol=pickle.HIGHEST_PROTOCOL)


def decode_request(body: bytes) -> ScoreBatch:
    """Server side: pickled body → batch of (3, H, W) uint8 tensors."""
    payload = pickle.loads(body)  # the competitor's choice; never do this in a real service
    images = [
        torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
        for data in payload["images"]
    ]
    return ScoreBatch(images=images, prompts=payload["prompts"], metadata=[None] * len(images))


@app.get("/health")
def health() -> Response:
    return jsonify({"ok": True})


@app.post("/score")
def score() -> Response:
    global _scorer
    batch = decode_request(request.get_data())
    with _lock:
        if _scorer is None:
            _scorer = _load_scorer()
        output = _scorer.score(batch)
    return jsonify({name: values.tolist() for name, values in output.samples.items()})


if SCORER_ENV in os.environ:
    # Set only for the gunicorn child, which imports this module in its worker after the fork: load the model
    # at worker start rather than inside the first timed request, and give the worker the same allocator
    # settings our server runs with, so that the comparison is between designs, not malloc settings.
    use_server_allocator()
    _scorer = _load_scorer()


@contextmanager
def gunicorn_server(port: int, scorer: str, threads: int = THREADS) -> Iterator[str]:
    """Run the app under gunicorn on loopback; yields the base URL."""
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "--worker-class",
        "gthread",
        "--workers",
        "1",
        "--threads",
        str(threads),
        "--keep-alive",
        "75",
        "--timeout",
        "600",
        "--bind",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "bench.http_pickle_baseline:app",
    ]
    url = f"http://127.0.0.1:{port}"
    with http_server(cmd, f"{url}/health", {SCORER_ENV: scorer}):
        yield url


class HttpClient:
    """One competitor client: its own keep-alive session."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, list[float]]:
        body = encode_request(images, prompts)
        response = self.session.post(
            f"{self.url}/score",
            data=body,
            headers={"Content-Type": "application/octet-stream"},
            timeout=600,
        )
        response.raise_for_status()
        return response.json()

    def close(self) -> None:
        self.session.close()
