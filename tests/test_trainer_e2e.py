"""Full E2PO iterations on tiny SD3 pipelines through the real diffusers / peft / accelerate classes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from services.inprocess import InProcessRewardClient
from tests.conftest import MeanPixelScorer
from tests.tiny_sd3 import tiny_model
from trainer.config import TrainConfig, build_config
from trainer.loop import Trainer
from trainer.model import OLD, POLICY, adapter_state
from trainer.rewards import RewardSet, RewardSpec

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a square", "three crosses"]


def tiny_config(tmp_path: Path, *, K: int = 3, G: int = 2, iterations: int = 1) -> TrainConfig:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    cfg = build_config("shapes")
    cfg.data.train = cfg.data.test = str(prompts)
    cfg.data.num_prompts = 2
    cfg.rollout.num_noises, cfg.rollout.num_conditions = G, K
    cfg.rollout.num_steps = 4
    cfg.rollout.batch_size = 5  # chunks do not align with prompts: exercises reassembly
    cfg.perturb.num_steps = 5
    cfg.optim.train_batch_size = 4
    cfg.run.iterations = iterations
    cfg.run.checkpoint_every = 2
    cfg.run.plot_every = 0
    return cfg


async def run_training(
    cfg: TrainConfig, run_dir: Path, *, latent: bool = False, resume: Path | None = None
) -> Trainer:
    # The reward is not what these tests are about: an in-process client, the server's checks without a
    # socket (test_trainer_faults and the CLI tests cover the gRPC path).
    cfg.reward.rewards = [RewardSpec(name="meanpixel")]
    rewards = RewardSet(cfg.reward)
    await rewards.connect({"meanpixel": InProcessRewardClient(MeanPixelScorer())})
    try:
        model = tiny_model(latent=latent)
        trainer = Trainer(cfg, model, rewards, run_dir, resume=resume)
        await trainer.train()
        return trainer
    finally:
        await rewards.close()


@pytest.mark.parametrize("latent", [False, True], ids=["pixel", "vae"])
def test_one_full_iteration(tmp_path: Path, latent: bool) -> None:
    cfg = tiny_config(tmp_path)
    before = tiny_model(latent=latent)
    theta0 = adapter_state(before.transformer, POLICY)
    trainer = asyncio.run(run_training(cfg, tmp_path / "run", latent=latent))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    for key in (
        "reward_mean",
        "zero_std_ratio",
        "group_std_mean",
        "nft/loss",
        "nft/old_deviate",
        "time/rollout",
        "time/perturb",
        "time/update",
        "time/reward_wait",
        "perturb/cos_anchor_mean",
    ):
        assert key in record, key
    samples = [json.loads(line) for line in (tmp_path / "run" / "rewards.jsonl").read_text().splitlines()]
    assert sorted(s["sample"] for s in samples) == list(range(2 * 2 * 3))  # every sample scored exactly once
    theta1 = adapter_state(trainer.model.transformer, POLICY)
    assert any(not torch.equal(theta0[k], theta1[k]) for k in theta0)  # the policy moved
    # θ_old ← d·θ_old + (1 − d)·θ with d = min(0.001·1, 0.5) after the first optimiser step.
    old = adapter_state(trainer.model.transformer, OLD)
    for k in theta0:
        torch.testing.assert_close(old[k], 0.001 * theta0[k] + 0.999 * theta1[k], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_resume_is_bit_for_bit(tmp_path: Path) -> None:
    straight = asyncio.run(run_training(tiny_config(tmp_path, iterations=4), tmp_path / "straight"))
    asyncio.run(run_training(tiny_config(tmp_path, iterations=2), tmp_path / "split"))
    resumed = asyncio.run(
        run_training(tiny_config(tmp_path, iterations=4), tmp_path / "split", resume=tmp_path / "split")
    )
    for name in (POLICY, OLD):
        a, b = adapter_state(straight.model.transformer, name), adapter_state(resumed.model.transformer, name)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    for key in straight.policy.ema:
        assert torch.equal(straight.policy.ema[key], resumed.policy.ema[key])

    def metrics(run: str) -> list[dict]:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    assert metrics("straight") == metrics("split")


class SecondRank(Accelerator):
    """A rank other than the main one, in a single process: what each rank of a launch sees of itself."""

    @property
    def is_main_process(self) -> bool:
        return False


def test_only_the_main_rank_rewrites_the_logs_on_resume(tmp_path: Path) -> None:
    """Every rank builds a Trainer on resume; if more than one rewrote metrics.jsonl they would race
    (the 2-process launch failed that way). Only the main rank drops the rows after the checkpoint."""
    run = tmp_path / "run"
    asyncio.run(run_training(tiny_config(tmp_path, iterations=2), run))
    metrics = run / "metrics.jsonl"
    with metrics.open("a") as f:  # a row of an iteration the stopped run did not checkpoint
        f.write(json.dumps({"iteration": 3, "reward_mean": 0.5}) + "\n")
    written = metrics.read_bytes()

    def build(accelerator: Accelerator) -> Trainer:
        cfg = tiny_config(tmp_path, iterations=4)
        cfg.reward.rewards = [RewardSpec(name="meanpixel")]
        return Trainer(cfg, tiny_model(), RewardSet(cfg.reward), run, accelerator=accelerator, resume=run)

    build(SecondRank(cpu=True))
    assert metrics.read_bytes() == written
    build(Accelerator(cpu=True))
    assert [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()] == [1, 2]
