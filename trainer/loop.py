"""The E2PO training loop. One iteration reads like the paper:

perturb → rollout (scored as it goes) → advantages → NFT update → old-policy sync → EMA → log → checkpoint.

State lives here (model, optimiser, EMA, generators, prompt stream, reward services); the math lives
in perturb / sampler / nft and the per-sample bookkeeping in rollout.
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
    adapter_named_params,
    adapter_params,
    adapter_state,
    load_adapter_state,
    lora_config_kwargs,
    use_adapter,
)
from trainer.nft import (
    blend_,
    ema_decay,
    group_advantages,
    group_stats,
    old_policy_decay,
    optimality_probability,
)
from trainer.perturb import PerturbResult, perturb_prompts, sample_initial_deltas
from trainer.prompts import PromptStream, Record, load_records, reward_metadata, with_tags
from trainer.rewards import RewardSet
from trainer.rollout import (
    RolloutPlan,
    draw_noise,
    iterate_chunks,
    num_variants,
    sample,
    sample_conditions,
    sample_sigmas,
)
from trainer.seeding import keyed_generator
from trainer.text import Conditioning
from trainer.tracking import RunLog
from trainer.update import TrainBatch, nft_update

log = logging.getLogger(__name__)
EMA = "ema"


def across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Per-rank scalars combined over all ranks: ``*_max`` / ``*_min`` by max / min, the rest by the mean
    (each rank holds the same number of prompts and samples, so the mean of means is the mean)."""
    gathered = gather_object([values])
    out = {}
    for key in values:
        column = [part[key] for part in gathered]
        reduce = max if key.endswith("_max") else min if key.endswith("_min") else np.mean
        out[key] = float(reduce(column))
    return out


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
        self.optimizer = torch.optim.AdamW(
            adapter_params(model.transformer, POLICY),
            lr=optim.lr,
            betas=optim.betas,
            weight_decay=optim.weight_decay,
            eps=optim.eps,
        )
        self.transformer, self.optimizer = acc.prepare(model.transformer, self.optimizer)
        self.ema = {
            k: p.detach().clone().float() for k, p in adapter_named_params(model.transformer, POLICY).items()
        }
        # Every random number of the algorithm is drawn from a generator keyed by what it is for
        # (trainer.seeding): independent of the device and of the rank layout, and replayed on resume.
        self.seed = config.run.seed
        records = with_tags(load_records(config.data.train, "train"), config.data.train_tags)
        self.stream = PromptStream(records, seed=config.run.seed, balance_by_tag=config.data.balance_by_tag)
        self.iteration = 0
        self.global_step = 0
        if resume is not None:
            self._restore(resume)
        self.log = RunLog(
            run_dir,
            resume_iteration=self.iteration if resume is not None else None,
            tensorboard=acc.is_main_process,
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
                if self.accelerator.is_main_process:
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
            self.log.close()

    async def run_iteration(self) -> IterationResult:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        acc = self.accelerator
        picked = self.stream.next(self.config.data.num_prompts)
        positions = list(range(acc.process_index, len(picked), acc.num_processes))
        records = [picked[i] for i in positions]
        prompts = [r["prompt"] for r in records]
        c_orig = self.model.text.encode(prompts)

        perturbed, c_opt = self.perturb(prompts, positions)
        timings["time/perturb"] = time.perf_counter() - started

        rollout_started = time.perf_counter()
        rollout = await self.rollout(records, c_orig, c_opt, positions)
        plan, rewards, outputs = rollout.plan, rollout.rewards, rollout.outputs
        timings["time/rollout"] = time.perf_counter() - rollout_started - rollout.reward_wait
        timings["time/reward_wait"] = rollout.reward_wait

        # Every rank computes the same advantages over all ranks' samples, then keeps its own slice.
        keys = [prompts[int(p)] for p in plan.prompt_index]
        rank_keys = gather_object([keys])
        all_rewards = np.concatenate(gather_object([rewards]))
        all_keys = [k for part in rank_keys for k in part]
        advantages = group_advantages(all_rewards, all_keys, std_mode=self.config.nft.std_mode)
        start = sum(len(part) for part in rank_keys[: acc.process_index])
        mine = advantages[start : start + len(keys)]
        r = optimality_probability(mine, adv_clip=self.config.nft.adv_clip).float()

        update_started = time.perf_counter()
        condition = self._training_condition(plan, c_orig, c_opt)
        sample_draws = [
            self.draws("update", positions[int(p)], int(j), int(k))
            for p, j, k in zip(plan.prompt_index, plan.noise_index, plan.condition_index, strict=True)
        ]
        parts, steps = nft_update(
            self.model,
            acc,
            self.transformer,
            self.optimizer,
            TrainBatch(x0=rollout.x0, condition=condition, r=r, generators=sample_draws),
            rollout.sigmas,
            self.config.nft,
            self.config.optim,
            self.draws("order", acc.process_index),
        )
        policy = adapter_params(self.model.transformer, POLICY)
        for _ in range(steps):
            self.global_step += 1
            if self.config.nft.ema:
                blend_(self.ema.values(), policy, ema_decay(self.global_step))
        decay = old_policy_decay(self.global_step, self.config.nft.old_decay)
        blend_(adapter_params(self.model.transformer, OLD), policy, decay)
        timings["time/update"] = time.perf_counter() - update_started
        timings["time/iteration"] = time.perf_counter() - started

        metrics: dict[str, Any] = {}
        metrics.update(group_stats(all_rewards, all_keys))
        for name, values in outputs.items():
            metrics[f"reward/{name}"] = float(np.mean(np.concatenate(gather_object([values]))))
        metrics.update({f"nft/{k}": v for k, v in across_ranks(parts).items()})
        metrics["nft/old_decay"] = decay
        metrics["nft/r_mean"] = across_ranks({"r": float(r.mean())})["r"]
        metrics.update(across_ranks(perturbed.stats() if perturbed is not None else {}))
        metrics.update(timings)
        metrics["global_step"] = self.global_step
        samples = [
            {
                "sample": start + i,
                "prompt": keys[i],
                "noise": int(plan.noise_index[i]),
                "condition": int(plan.condition_index[i]),
                "reward": float(rewards[i]),
                **{name: float(values[i]) for name, values in outputs.items()},
            }
            for i in range(len(keys))
        ]
        samples = [s for part in gather_object([samples]) for s in part]  # every rank's, logged once
        return IterationResult(metrics=metrics, samples=samples)

    def draws(self, purpose: str, *key: int) -> torch.Generator:
        """The generator of this iteration's draws for ``purpose`` and ``key`` (trainer.seeding)."""
        return keyed_generator(self.seed, purpose, self.iteration, *key)

    # -- steps -------------------------------------------------------------------------------------

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
        sigmas = sample_sigmas(model, cfg.num_steps)
        x0_parts = []
        use_adapter(model.transformer, OLD)
        try:
            for indices in iterate_chunks(plan, cfg.batch_size):
                x1 = noise[plan.prompt_index[indices], plan.noise_index[indices]].to(device)
                orig, opt, perturbed = sample_conditions(indices, plan, c_orig, c_opt)
                x0 = await asyncio.to_thread(
                    sample, model, x1, orig, opt, perturbed, sigmas, cfg, self.accelerator.autocast
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
        finally:
            use_adapter(model.transformer, POLICY)
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
        transformer = self.model.transformer
        ema_state = self._ema_state()
        return ckpt.save_checkpoint(
            self.run_dir / "checkpoints",
            state=ckpt.TrainerState(
                iteration=self.iteration,
                global_step=self.global_step,
                prompt_stream=self.stream.state_dict(),
                extra={"rewards": self.rewards.identities},
            ),
            adapters={
                POLICY: adapter_state(transformer, POLICY),
                OLD: adapter_state(transformer, OLD),
                EMA: ema_state,
            },
            optimizer=self.optimizer,
            generators={},
            lora_export=ema_state,
            lora_config=lora_config_kwargs(transformer, POLICY),
        )

    def _ema_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.ema.items()}

    def _restore(self, path: Path) -> None:
        state, adapters = ckpt.load_checkpoint(path, optimizer=self.optimizer, generators={})
        transformer = self.model.transformer
        load_adapter_state(transformer, POLICY, adapters[POLICY])
        load_adapter_state(transformer, OLD, adapters[OLD])
        if set(adapters[EMA]) != set(self.ema):
            raise ValueError(f"checkpoint {path} has an EMA for different adapter parameters")
        self.ema = {k: adapters[EMA][k].to(v.device).float().clone() for k, v in self.ema.items()}
        use_adapter(transformer, POLICY)
        self.iteration = state.iteration
        self.global_step = state.global_step
        self.stream.load_state_dict(state.prompt_stream)
