"""The DiffusionNFT policy update on one iteration's rollouts (REFERENCE §2).

Per sample, the sampler's timesteps are shuffled and the first int(0.99·steps) (9 of 10) are trained
on; at each, fresh noise gives x_t = (1 − t)·x0 + t·ε and three forwards share (x_t, t, C_orig):
θ_old (no grad), θ (grad) and, when kl_weight > 0, the base model with adapters disabled (no grad).
Each loss is backpropagated at once scaled by 1/(micro-batches·timesteps) of its accumulation window,
so memory holds one forward's graph; one optimiser step closes each window.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
from accelerate import Accelerator

from trainer.model import OLD, FlowModel, active_adapter
from trainer.nft import NFTConfig, nft_loss
from trainer.text import Conditioning
from trainer.validation import check, check_literals, positive


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW on the LoRA weights of θ (REFERENCE §2, Table 3)."""

    lr: float = 3e-4
    """Policy learning rate (Table 3: 3e-4)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (β1, β2) (DiffusionNFT's defaults)."""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay (Table 3: 1e-4)."""
    eps: float = 1e-8
    """AdamW ε."""
    grad_clip: float = 1.0
    """Max global gradient norm before each optimiser step (Table 3: 1.0); 0 disables clipping."""
    train_batch_size: int = 8
    """Samples per training forward."""
    optimizer_steps_per_iteration: int = 1
    """**choice**: Table 3's "grad-accum per epoch 1" read as one optimiser step per iteration, the
    gradient accumulated over all of the iteration's samples and train timesteps."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    """accelerate's autocast for the forwards (Table 3: fp16); the NFT loss itself runs in float32."""

    def __post_init__(self) -> None:
        check_literals("optim", self)
        positive("optim", self, "lr", "eps", "train_batch_size", "optimizer_steps_per_iteration")
        positive("optim", self, "weight_decay", "grad_clip", strict=False)  # grad_clip 0: no clipping
        ok = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        check("optim", "betas", self.betas, ok, "two values in [0, 1)")


@dataclass
class Learner:
    """The model as an update trains it. Two handles of one transformer: ``prepared`` is the
    accelerate-prepared (possibly DDP-wrapped) module the θ forward and backward go through;
    ``model.transformer`` is the bare module of the no-grad θ_old and reference forwards, which must not
    trigger DDP's gradient hooks."""

    model: FlowModel
    prepared: torch.nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator


@dataclass
class TrainBatch:
    """One iteration's samples as the update needs them.

    Each sample has its own generator, which draws its training timesteps and then its noise at each of
    them, so a sample's draws do not depend on which rank or micro-batch it lands in
    (``trainer.seeding``); ``order`` only shuffles the samples into micro-batches.
    """

    x0: torch.Tensor
    """(N, C, H, W) the clean rollout samples."""
    condition: Conditioning
    """The training condition of each sample (C_orig under decoupled optimisation)."""
    r: torch.Tensor
    """(N,) optimality probabilities."""
    sigmas: torch.Tensor
    """(steps + 1,) the rollout's σ grid; training timesteps are drawn from its first ``steps``."""
    generators: list[torch.Generator]
    order: torch.Generator


def train_sigmas(sigmas: torch.Tensor, fraction: float, generators: list[torch.Generator]) -> torch.Tensor:
    """(N, T_train) per-sample shuffled sampler timesteps σ_i (i < steps), the first int(fraction·steps);
    sample n's permutation is drawn from ``generators[n]``."""
    steps = len(sigmas) - 1
    # int(), as DiffusionNFT computes it: 0.99 of 10 steps trains on 9 (a ceiling would give all 10).
    keep = max(1, int(fraction * steps))
    order = torch.stack([torch.randperm(steps, generator=g) for g in generators])
    return sigmas[:-1][order[:, :keep]]


def nft_update(
    learner: Learner, batch: TrainBatch, nft: NFTConfig, optim: OptimConfig
) -> tuple[dict[str, float], int]:
    """Run this iteration's optimiser steps; return mean loss parts and the number of steps taken.

    With equal micro-batches the gradient is the mean over samples, so the shuffle, and how the samples
    are split across DDP ranks, change it only by float rounding.
    """
    accelerator, device = learner.accelerator, learner.accelerator.device
    num = batch.x0.shape[0]
    if len(batch.generators) != num:
        raise ValueError(f"need one generator per sample, got {len(batch.generators)} for {num}")
    order = torch.randperm(num, generator=batch.order)
    t_all = train_sigmas(batch.sigmas, nft.train_timestep_fraction, batch.generators)
    windows = [w for w in order.tensor_split(optim.optimizer_steps_per_iteration) if len(w)]
    totals: dict[str, float] = defaultdict(float)
    count = 0
    grad_norms: list[float] = []
    for window in windows:
        micro = window.split(optim.train_batch_size)
        scale = 1.0 / (len(micro) * t_all.shape[1])
        for m, idx in enumerate(micro):
            x0 = batch.x0[idx].to(device)
            cond = batch.condition[idx.to(batch.condition.pooled.device)].to(device)
            r = batch.r[idx].to(device)
            for j in range(t_all.shape[1]):
                t = t_all[idx, j].to(device)
                eps = torch.stack(
                    [torch.randn(x0.shape[1:], generator=batch.generators[int(i)]) for i in idx]
                ).to(device)
                x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
                last = m == len(micro) - 1 and j == t_all.shape[1] - 1
                parts = _loss_and_backward(learner, x_t, x0, t, cond, r, nft, scale, last)
                for key, value in parts.items():
                    totals[key] += value
                count += 1
        if optim.grad_clip > 0:
            norm = accelerator.clip_grad_norm_(learner.prepared.parameters(), optim.grad_clip)
            grad_norms.append(float(norm))
        learner.optimizer.step()
        learner.optimizer.zero_grad(set_to_none=True)
    means = {k: v / max(count, 1) for k, v in totals.items()}
    if grad_norms:
        means["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return means, len(windows)


def _loss_and_backward(
    learner: Learner,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    r: torch.Tensor,
    nft: NFTConfig,
    scale: float,
    sync: bool,
) -> dict[str, float]:
    model, accelerator, transformer = learner.model, learner.accelerator, learner.prepared
    bare = model.transformer
    dtype = bare.dtype
    args = (x_t.to(dtype), t, cond.prompt_embeds.to(dtype), cond.pooled.to(dtype))
    with torch.no_grad(), accelerator.autocast():
        with active_adapter(bare, OLD):
            v_old = model.velocity(*args)
        v_ref = None
        if nft.kl_weight > 0:
            bare.disable_adapters()
            v_ref = model.velocity(*args)
            bare.enable_adapters()
    with accelerator.no_sync(transformer) if not sync else contextlib.nullcontext():
        with accelerator.autocast():
            v_theta = transformer(
                hidden_states=args[0],
                encoder_hidden_states=args[2],
                pooled_projections=args[3],
                timestep=t * 1000,
                return_dict=False,
            )[0]
        loss, parts = nft_loss(
            v_theta=v_theta,
            v_old=v_old,
            x_t=x_t,
            x0=x0,
            t=t,
            r=r,
            nft_beta=nft.nft_beta,
            adv_clip=nft.adv_clip,
            v_ref=v_ref,
            kl_weight=nft.kl_weight,
        )
        accelerator.backward(loss * scale)
    out = {"loss": float(loss.detach())}
    out.update({k: float(v.detach().float().mean()) for k, v in parts.items()})
    return out
