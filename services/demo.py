"""`make demo` (until the trainer lands): serve a reward model and score images through the client.

Starts ``python -m services.serve compressibility --port 0`` as a separate process (exactly as a user
would), renders a few shapes-world scenes plus a noise image, scores them over gRPC with the async
client, prints a table and stops the server with SIGTERM (which drains and exits 0).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import numpy as np

from services.client import RewardClient
from shapes.render import sample_scene
from shapes.vocab import TAGS


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.serve", "compressibility", "--port", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"reward server did not start: {line!r}")
    return proc, line.removeprefix("listening on ")


async def score(endpoint: str) -> None:
    rng = np.random.default_rng(0)
    prompts, images = [], []
    for tag in TAGS:
        metadata, image = sample_scene(tag, rng)
        prompts.append(metadata["prompt"])
        images.append(image)
    prompts.append("uniform noise")
    images.append(rng.integers(0, 256, size=images[0].shape, dtype=np.uint8))
    async with RewardClient(endpoint) as client:
        scores = await client.score(np.stack(images), prompts)
    info = scores.model
    print(f"model {info.name} v{info.version} ({info.checkpoint_sha256}) at {endpoint}")
    print(f"{'prompt':<52} {'jpeg kB':>8} {'reward':>9}")
    for i, prompt in enumerate(prompts):
        kb, reward = scores.values["compressibility/jpeg_kb"][i], scores.values["compressibility"][i]
        print(f"{prompt:<52} {kb:>8.3f} {reward:>9.5f}")


def main() -> int:
    proc, endpoint = start_server()
    try:
        asyncio.run(score(endpoint))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    print(f"server drained and exited with {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
