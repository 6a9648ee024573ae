"""The E2PO training loop. One iteration reads like the paper:

perturb → rollout (scored as it goes) → advantages → NFT update → old-policy sync → EMA → log → checkpoint.

``Trainer.run_iteration`` is that list of named steps. State lives here (model, optimiser, generators,
prompt stream, reward services) and in the :class:`~trainer.policy.Policy` (θ, θ_old, EMA); the math
lives in perturb / sampler / nft and the per-sample bookkeeping in rollout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

from trainer import checkpoint as ckpt
from trainer.config import TrainConfig
from trainer.model import (
    OLD,
    POLICY,
    FlowModel,
    lora_config_kwargs,
)
from trainer.nft import (
    group_advantages,
    group_stats,
    optimality_probability,
)
from trainer.perturb import PerturbResult, perturb_prompts, sample_initial_deltas
from trainer.policy import EMA, Policy
from trainer.prompts import PromptStream, Record, load_records, reward_metadata, with_prompts, with_tags
from trainer.rewards import RewardSet
from trainer.rollout import (
    RolloutPlan,
    denoise,
    draw_noise,
    inference_sigmas,
    iterate_chunks,
    num_variants,
    sample_conditions,
)
from trainer.seeding import keyed_generator
from trainer.text import Conditioning
from trainer.tracking import RunLog
from trainer.update import Learner, TrainBatch, nft_update

log = logging.getLogger(__name__)


def combine(parts: list[dict[str, float]]) -> dict[str, float]:
    """Per-rank scalars combined over all ranks: ``*_max`` / ``*_min`` by max / min, the rest by the mean
    (each rank holds the same number of prompts and samples, so the mean of means is the mean)."""
    out = {}
    for key in parts[0] if parts else ():
        column = [part[key] for part in parts]
        reduce = max if key.endswith("_max") else min if key.endswith("_min") else np.mean
        out[key] = float(reduce(column))
    return out


@dataclass
class RankSamples:
    """What one rank contributes to the iteration's groups and log, gathered once before the update."""

    keys: list[str]
    """Group key (prompt) of each of this rank's samples."""
    rewards: np.ndarray
    """(n,) R = Σ w·R_k per sample."""
    outputs: dict[str, np.ndarray]
    """Every output of every reward service, (n,) each."""
    noise_index: list[int]
    condition_index: list[int]
    """Which noise j and condition k (−1 = C_orig) generated each sample."""
    perturb_stats: dict[str, float]
    """This rank's PerturbResult.stats() ({} for K = 1), combined over ranks for the log."""


@dataclass
class Rollout:
    """One iteration's samples: plan, clean x0 (N, C, H, W), sigmas, and their scores."""

    plan: RolloutPlan
    x0: torch.Tensor
    sigmas: torch.Tensor
    rewards: np.ndarray
    """(N,) R = Σ w·R_k per sample."""
    outputs: dict[str, np.ndarray]
    """Every output of every reward service, (N,) each."""
    reward_wait: float
    """Seconds spent waiting for scores after the last chunk was sampled."""


@dataclass
class Groups:
    """The iteration's advantage groups over every rank's samples (each rank computes the same), where
    this rank's samples start among them, and the optimality probabilities r of all samples."""

    ranks: list[RankSamples]
    """Every rank's samples, in rank order."""
    rank: int
    all_keys: list[str]
    all_rewards: np.ndarray
    r_all: torch.Tensor

    @property
    def start(self) -> int:
        """Where this rank's samples start among every rank's."""
        return sum(len(part.keys) for part in self.ranks[: self.rank])

    @property
    def r(self) -> torch.Tensor:
        """This rank's r."""
        return self.r_all[self.start : self.start + len(self.ranks[self.rank].keys)]


@dataclass
class IterationResult:
    metrics: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Owns a run: ``await trainer.train()`` runs iterations until ``config.run.iterations``."""

    def __init__(
        self,
        config: TrainConfig,
        model: FlowModel,
        rewards: RewardSet,
        run_dir: Path,
        *,
        accelerator: Accelerator | None = None,
        resume: Path | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.rewards = rewards
        self.run_dir = run_dir
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.optim.mixed_precision, cpu=model.transformer.device.type == "cpu"
        )
        acc = self.accelerator
        if config.data.num_prompts % acc.num_processes:
            raise ValueError(
                f"data.num_prompts = {config.data.num_prompts} must be a multiple of the {acc.num_processes} "
                "processes: each rank samples whole prompts, the same number on every rank"
            )
        optim = config.optim
        self.policy = Policy(model.transformer, config.nft)
        self.optimizer = torch.optim.AdamW(
            self.policy.trainable(),
            lr=optim.lr,
            betas=optim.betas,
            weight_decay=optim.weight_decay,
            eps=optim.eps,
        )
        self.transformer, self.optimizer = acc.prepare(model.transformer, self.optimizer)
        # Every random number of the algorithm is drawn from a generator keyed by what it is for
        # (trainer.seeding): independent of the device and of the rank layout, and replayed on resume.
        self.seed = config.run.seed
        records = with_tags(load_records(config.data.train, "train"), config.data.train_tags)
        records = with_prompts(records, config.data.train_prompts)
        self.stream = PromptStream(records, seed=config.run.seed, balance_by_tag=config.data.balance_by_tag)
        self.iteration = 0
        if resume is not None:
            self._restore(resume)
        # Only the main process owns the run's files: a second rank truncating the logs on resume
        # would race with the first one's atomic rewrite.
        self.log = (
            RunLog(run_dir, resume_iteration=self.iteration if resume is not None else None)
            if acc.is_main_process
            else None
        )

    # -- the run -----------------------------------------------------------------------------------

    async def train(self) -> None:
        cfg = self.config.run
        bar = tqdm(
            total=cfg.iterations,
            initial=self.iteration,
            # K = 1 is the DiffusionNFT baseline: say so, so two runs side by side are told apart.
            desc="E2PO" if self.config.rollout.num_conditions > 1 else "DiffusionNFT",
            disable=not self.accelerator.is_main_process,
        )
        try:
            while self.iteration < cfg.iterations:
                result = await self.run_iteration()
                self.iteration += 1
                if self.log is not None:
                    self.log.log(self.iteration, result.metrics)
                    self.log.log_samples(self.iteration, result.samples)
                    if cfg.plot_every and self.iteration % cfg.plot_every == 0:
                        self.log.plot()
                if self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.iterations:
                    self.save()
                bar.update(1)
                bar.set_postfix(
                    reward=f"{result.metrics['reward_mean']:.3f}",
                    zero_std=f"{result.metrics['zero_std_ratio']:.2f}",
                )
        finally:
            bar.close()
            if self.log is not None:
                self.log.close()

    async def run_iteration(self) -> IterationResult:
        """One iteration of Algorithm 1, step by step."""
        timings: dict[str, float] = {}
        started = time.perf_counter()
        records, positions = self.prompts()
        prompts = [r["prompt"] for r in records]
        c_orig = self.model.text.encode(prompts)

        perturbed, c_opt = self.perturb(prompts, positions)
        timings["time/perturb"] = time.perf_counter() - started

        rollout_started = time.perf_counter()
        rollout = await self.rollout(records, c_orig, c_opt, positions)
        timings["time/rollout"] = time.perf_counter() - rollout_started - rollout.reward_wait
        timings["time/reward_wait"] = rollout.reward_wait

        groups = self.advantages(prompts, rollout, perturbed)

        update_started = time.perf_counter()
        parts, steps = self.update(rollout, groups.r, c_orig, c_opt, positions)
        decay = self.policy.after_update(steps)  # sync θ_old and the EMA
        timings["time/update"] = time.perf_counter() - update_started
        timings["time/iteration"] = time.perf_counter() - started

        metrics = self.iteration_metrics(groups, parts, decay, timings)
        return IterationResult(metrics=metrics, samples=self.sample_rows(groups))

    # -- the steps ---------------------------------------------------------------------------------

    def prompts(self) -> tuple[list[Record], list[int]]:
        """This rank's records of the iteration's prompts, and their positions among all ranks'."""
        acc = self.accelerator
        picked = self.stream.next(self.config.data.num_prompts)
        positions = list(range(acc.process_index, len(picked), acc.num_processes))
        return [picked[i] for i in positions], positions

    def advantages(self, prompts: list[str], rollout: Rollout, perturbed: PerturbResult | None) -> Groups:
        """Group advantages over every rank's samples. The iteration's one gather before the update
        carries what the groups and the log need from each rank."""
        plan = rollout.plan
        mine = RankSamples(
            keys=[prompts[int(p)] for p in plan.prompt_index],
            rewards=rollout.rewards,
            outputs=rollout.outputs,
            noise_index=plan.noise_index.tolist(),
            condition_index=plan.condition_index.tolist(),
            perturb_stats=perturbed.stats() if perturbed is not None else {},
        )
        ranks = gather_object([mine])
        all_keys = [k for part in ranks for k in part.keys]
        all_rewards = np.concatenate([part.rewards for part in ranks])
        advantages = group_advantages(all_rewards, all_keys, std_mode=self.config.nft.std_mode)
        r_all = optimality_probability(advantages, adv_clip=self.config.nft.adv_clip).float()
        return Groups(
            ranks=ranks,
            rank=self.accelerator.process_index,
            all_keys=all_keys,
            all_rewards=all_rewards,
            r_all=r_all,
        )

    def update(
        self,
        rollout: Rollout,
        r: torch.Tensor,
        c_orig: Conditioning,
        c_opt: Conditioning | None,
        positions: list[int],
    ) -> tuple[dict[str, float], int]:
        """The NFT update of θ on this iteration's samples, conditioned on C_orig (decoupled optimisation)."""
        plan = rollout.plan
        condition = self._training_condition(plan, c_orig, c_opt)
        sample_draws = [
            self.draws("update", positions[int(p)], int(j), int(k))
            for p, j, k in zip(plan.prompt_index, plan.noise_index, plan.condition_index, strict=True)
        ]
        batch = TrainBatch(
            x0=rollout.x0,
            condition=condition,
            r=r,
            sigmas=rollout.sigmas,
            generators=sample_draws,
            order=self.draws("order", self.accelerator.process_index),
        )
        learner = Learner(self.model, self.transformer, self.optimizer, self.accelerator)
        return nft_update(learner, batch, self.config.nft, self.config.optim)

    def iteration_metrics(
        self,
        groups: Groups,
        parts: dict[str, float],
        decay: float,
        timings: dict[str, float],
    ) -> dict[str, Any]:
        """What DiffusionNFT logs (group statistics, loss parts), E2PO's perturbation statistics, timings."""
        metrics: dict[str, Any] = {}
        metrics.update(group_stats(groups.all_rewards, groups.all_keys))
        for name in groups.ranks[groups.rank].outputs:
            values = np.concatenate([part.outputs[name] for part in groups.ranks])
            metrics[f"reward/{name}"] = float(np.mean(values))
        # The iteration's one gather after the update: the loss parts.
        metrics.update({f"nft/{k}": v for k, v in combine(gather_object([parts])).items()})
        metrics["nft/old_decay"] = decay
        metrics["nft/r_mean"] = float(groups.r_all.mean())
        metrics.update(combine([p.perturb_stats for p in groups.ranks]))
        metrics.update(timings)
        metrics["global_step"] = self.policy.global_step
        return metrics

    def sample_rows(self, groups: Groups) -> list[dict[str, Any]]:
        """One row per sample of every rank (prompt, noise, condition, rewards), logged once."""
        rows = []
        for part in groups.ranks:
            for i, key in enumerate(part.keys):
                rows.append(
                    {
                        "sample": len(rows),
                        "prompt": key,
                        "noise": part.noise_index[i],
                        "condition": part.condition_index[i],
                        "reward": float(part.rewards[i]),
                        **{name: float(values[i]) for name, values in part.outputs.items()},
                    }
                )
        return rows

    def draws(self, purpose: str, *key: int) -> torch.Generator:
        """The generator of this iteration's draws for ``purpose`` and ``key`` (trainer.seeding)."""
        return keyed_generator(self.seed, purpose, self.iteration, *key)

    def perturb(
        self, prompts: list[str], positions: list[int]
    ) -> tuple[PerturbResult | None, Conditioning | None]:
        """Optimise the K − 1 (or K) CLIP-L perturbations of every prompt; C_opt flattened prompt-major.

        Prompt ``prompts[i]`` is the ``positions[i]``-th of the iteration; its initial δ is keyed by that.
        """
        num_m = num_variants(self.config.rollout)
        if num_m == 0:
            return None, None
        init_std = self.config.perturb.init_std

        def draw_init(mask: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat(
                [
                    sample_initial_deltas(mask[i : i + 1], num_m, dim, init_std, self.draws("perturb", pos))
                    for i, pos in enumerate(positions)
                ]
            )

        return perturb_prompts(self.model.text, prompts, num_m, self.config.perturb, draw_init)

    async def rollout(
        self, records: list[Record], c_orig: Conditioning, c_opt: Conditioning | None, positions: list[int]
    ) -> Rollout:
        """Sample the G×K grid with θ_old chunk by chunk; each decoded chunk is sent for scoring at once."""
        cfg = self.config.rollout
        model = self.model
        device = self.accelerator.device
        plan = RolloutPlan.build(len(records), cfg)
        noise = draw_noise(cfg, model.sample_shape, [self.draws("noise", p) for p in positions])
        sigmas = inference_sigmas(model, cfg.num_steps)
        x0_parts = []
        with self.policy.adapter(OLD):
            for indices in iterate_chunks(plan, cfg.batch_size):
                x1 = noise[plan.prompt_index[indices], plan.noise_index[indices]].to(device)
                orig, opt, perturbed = sample_conditions(indices, plan, c_orig, c_opt)
                x0 = await asyncio.to_thread(
                    denoise, model, x1, orig, opt, perturbed, sigmas, cfg, self.accelerator.autocast
                )
                images = (model.decode(x0) * 255).round().to(torch.uint8).cpu()
                chunk_records = [records[int(p)] for p in plan.prompt_index[indices]]
                self.rewards.submit(
                    indices,
                    images,
                    [r["prompt"] for r in chunk_records],
                    [reward_metadata(r) for r in chunk_records],
                )
                x0_parts.append(x0.cpu())
        waited = time.perf_counter()
        chunks = await self.rewards.collect()
        reward_wait = time.perf_counter() - waited
        total = np.full(len(plan), np.nan)
        outputs: dict[str, np.ndarray] = {}
        for chunk in chunks:
            total[chunk.indices.numpy()] = chunk.total
            for name, values in chunk.outputs.items():
                outputs.setdefault(name, np.full(len(plan), np.nan))[chunk.indices.numpy()] = values
        if np.isnan(total).any():
            raise RuntimeError("a rollout sample has no reward; refusing to train on invented values")
        return Rollout(plan, torch.cat(x0_parts), sigmas, total, outputs, reward_wait)

    def _training_condition(
        self, plan: RolloutPlan, c_orig: Conditioning, c_opt: Conditioning | None
    ) -> Conditioning:
        """C_orig for every sample (decoupled optimisation), or the generating condition (ablation)."""
        orig, opt, _ = sample_conditions(torch.arange(len(plan)), plan, c_orig, c_opt)
        return orig if self.config.rollout.train_condition == "original" else opt

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        adapters = self.policy.state()
        return ckpt.save_checkpoint(
            self.run_dir / "checkpoints",
            state=ckpt.TrainerState(
                iteration=self.iteration,
                global_step=self.policy.global_step,
                prompt_stream=self.stream.state_dict(),
                extra={"rewards": self.rewards.identities},
            ),
            adapters=adapters,
            optimizer=self.optimizer,
            generators={},
            lora_export=adapters[EMA],
            lora_config=lora_config_kwargs(self.model.transformer, POLICY),
        )

    def _restore(self, path: Path) -> None:
        state, adapters = ckpt.load_checkpoint(path, optimizer=self.optimizer, generators={})
        self.policy.load_state(adapters, state.global_step, path)
        self.iteration = state.iteration
        self.stream.load_state_dict(state.prompt_stream)
