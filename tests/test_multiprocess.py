"""Two processes compute what one process computes: ``accelerate launch --multi_gpu --num_processes 2`` on
CPU (gloo), exactly as docs/trainer.md tells users to launch, against the 1-process run of the same config.

Every random draw is keyed by prompt and sample (trainer.seeding), rewards and advantages are gathered,
and DDP averages the gradients, so the runs differ only by the order of floating-point sums. Adam's first
step, g / (|g| + ε), turns that into at most a few % of one step for the few weights whose gradient is
near ε; everything else agrees to 1e-7.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.geneval.scorer import GenEvalScorer
from tests.conftest import running_server

ROOT = Path(__file__).resolve().parents[1]
G, K, PROMPTS = 2, 2, 4
SMALL = [
    f"data.num_prompts={PROMPTS}",
    f"rollout.num_noises={G}",
    f"rollout.num_conditions={K}",
    "rollout.num_steps=3",
    "rollout.batch_size=4",
    "perturb.num_steps=3",
    "optim.train_batch_size=4",
    "run.plot_every=0",
    "run.checkpoint_every=1",
]
LR = 1e-3  # the shapes preset's: one Adam step moves a weight by about this much


def launch(processes: int) -> list[str]:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate is not None, "accelerate's launcher is installed with the project"
    if processes == 1:
        return [sys.executable, "-m", "trainer.run"]
    return [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer.run"]  # fmt: skip


async def train(
    processes: int, endpoint: str, run_dir: Path, iterations: int, *, resume: bool = False
) -> str:
    args = ["--iterations", str(iterations), "--reward-endpoint", f"geneval={endpoint}"]
    if resume:
        args += ["--resume", str(run_dir)]
    else:
        args += ["--out", str(run_dir), *(a for o in SMALL for a in ("--set", o))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = await asyncio.create_subprocess_exec(
        *launch(processes), *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, failure(out.decode())
    return out.decode()


def failure(output: str) -> str:
    """The first traceback (the rank that failed first; the others only lose their peer) and the end."""
    first = max(output.find("Traceback"), 0)
    return f"{output[first : first + 6000]}\n[...]\n{output[-1500:]}"


def adapters(run_dir: Path, iteration: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"iter-{iteration:06d}" / "adapters.safetensors")


def rewards_by_sample(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "rewards.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("time", "sample")} for row in rows]


@pytest.mark.timeout(600)
def test_two_processes_train_like_one_and_resume_identically(tmp_path: Path) -> None:
    one, two, split = tmp_path / "one", tmp_path / "two", tmp_path / "split"

    async def main() -> str:
        async with running_server(GenEvalScorer.build(detector="shapes"), name="geneval") as server:
            endpoint = f"127.0.0.1:{server.port}"
            await asyncio.gather(train(1, endpoint, one, 1), train(2, endpoint, two, 2))
            await train(2, endpoint, split, 1)
            return await train(2, endpoint, split, 2, resume=True)

    resumed_output = asyncio.run(main())

    # Same samples, same rewards: every prompt's G·K group is on one rank, and all are logged once.
    assert sorted(map(json.dumps, rewards_by_sample(one))) == sorted(
        map(json.dumps, rewards_by_sample(two)[: PROMPTS * G * K])
    )
    first = [json.loads(line) for line in (two / "rewards.jsonl").read_text().splitlines()]
    assert len(first) == 2 * PROMPTS * G * K
    assert sorted(r["sample"] for r in first[: PROMPTS * G * K]) == list(range(PROMPTS * G * K))
    assert set(Counter(r["prompt"] for r in first[: PROMPTS * G * K]).values()) == {G * K}

    # Metrics and checkpoints written once, by one process.
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["iter-000001", "iter-000002", "latest"]
    assert resumed_output.count("LoRA:") == 1
    m1 = json.loads((one / "metrics.jsonl").read_text().splitlines()[0])
    m2 = json.loads((two / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward_mean", "zero_std_ratio", "nft/loss", "nft/grad_norm", "perturb/cos_anchor_mean"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key

    # The LoRA after one iteration: θ, θ_old and the EMA equal the 1-process run's.
    a, b = adapters(one, 1), adapters(two, 1)
    assert set(a) == set(b)
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max() < 0.05 * LR
    assert (diff > 1e-7).float().mean() < 0.005

    # A 2-process resume continues bit for bit.
    for key, value in adapters(two, 2).items():
        assert torch.equal(value, adapters(split, 2)[key]), key
