"""Rollouts: the G×K exploration grid per prompt, sampled with the old policy by a deterministic ODE.

For every prompt, G latent noises are drawn and each is shared by the K conditions (E2PO Eq. 8), so
within a group the only difference between samples of one noise is the condition. Condition k = 0 is
C_orig (reference-anchored batching) and k ≥ 1 are the optimised perturbations; while σ is high the
perturbed samples follow γ(σ)·C_opt + (1 − γ(σ))·C_orig (Eq. 13), fading to C_orig. Every sample's
*training* condition is C_orig whatever generated it (decoupled optimisation); only x0, the sigmas
and indices are kept, not the trajectory (DiffusionNFT needs no log-probabilities).

Sample order is (prompt, noise, condition), row-major: index = (p·G + j)·K + k.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from trainer.model import FlowModel
from trainer.sampler import perturbation_weight
from trainer.sampler import sample as ode_sample
from trainer.text import Conditioning
from trainer.validation import check, check_literals, positive


@dataclass(kw_only=True)
class RolloutConfig:
    """Sampling of the exploration set: G noises × K conditions per prompt."""

    num_noises: int = 4
    """G in the paper: latent noises per prompt, each shared across the K conditions (Eq. 8)."""
    num_conditions: int = 12
    """K in the paper: the original condition plus K − 1 optimised perturbations. K = 1 is DiffusionNFT."""
    num_steps: int = 10
    """Sampler steps for rollouts (Table 3: train sample steps 10)."""
    sampler: Literal["dpm2m", "euler"] = "dpm2m"
    """DPM-Solver++(2M) as DiffusionNFT; Euler as an option."""
    rho: float = 0.4
    """Noise-aware schedule width (Eq. 13): perturbation only while σ > 1 − ρ."""
    schedule: Literal["noise_aware", "static"] = "noise_aware"
    """``static`` applies the perturbed condition at every step (ablation)."""
    include_original: bool = True
    """Reference-anchored batching: one of the K conditions is C_orig. False = all K perturbed (ablation)."""
    train_condition: Literal["original", "generating"] = "original"
    """Decoupled optimisation: updates condition on C_orig (default) or on the condition that
    generated the sample (ablation)."""
    batch_size: int = 16
    """Samples per transformer forward during rollout (memory knob; does not change results)."""

    def __post_init__(self) -> None:
        check_literals("rollout", self)
        positive("rollout", self, "num_noises", "num_conditions", "num_steps", "batch_size")
        check("rollout", "rho", self.rho, 0 <= self.rho <= 1, "in [0, 1]")


@dataclass
class RolloutPlan:
    """Index bookkeeping of one iteration's samples (all tensors (N,), N = P·G·K)."""

    prompt_index: torch.Tensor
    noise_index: torch.Tensor
    condition_index: torch.Tensor
    variant_index: torch.Tensor
    """Which optimised variant generated the sample (−1 = C_orig)."""

    @classmethod
    def build(cls, num_prompts: int, config: RolloutConfig) -> RolloutPlan:
        G, K = config.num_noises, config.num_conditions
        p, j, k = torch.meshgrid(torch.arange(num_prompts), torch.arange(G), torch.arange(K), indexing="ij")
        k = k.reshape(-1)
        variant = k - 1 if config.include_original else k
        return cls(p.reshape(-1), j.reshape(-1), k, variant)

    def __len__(self) -> int:
        return len(self.prompt_index)


def num_variants(config: RolloutConfig) -> int:
    """Optimised conditions needed per prompt: K − 1 with C_orig in the grid, K without."""
    return config.num_conditions - 1 if config.include_original else config.num_conditions


def draw_noise(
    config: RolloutConfig, shape: tuple[int, int, int], generators: list[torch.Generator]
) -> torch.Tensor:
    """(P, G, C, H, W) standard normal noise, prompt p's G noises from ``generators[p]`` (CPU generators:
    device independent, and keyed per prompt so that the split of prompts over ranks does not matter)."""
    return torch.stack([torch.randn((config.num_noises, *shape), generator=g) for g in generators])


def inference_sigmas(model: FlowModel, num_steps: int) -> torch.Tensor:
    """The scheduler's own shifted sigma grid (num_steps + 1 values, 1 → 0)."""
    model.scheduler.set_timesteps(num_steps)
    return model.scheduler.sigmas.detach().float().cpu().clone()


@torch.no_grad()
def denoise(
    model: FlowModel,
    x1: torch.Tensor,
    c_orig: Conditioning,
    c_opt: Conditioning,
    perturbed: torch.Tensor,
    sigmas: torch.Tensor,
    config: RolloutConfig,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Integrate the ODE from x1 (B, C, H, W) at σ = 1 to x0 with the currently active adapter.

    ``perturbed`` (B,) bool marks samples generated with C_opt; the others use C_orig throughout.
    ``autocast`` makes the mixed-precision context of each forward (e.g. ``accelerator.autocast``).
    """
    device = x1.device
    weights = perturbed.to(device, torch.float32)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        gamma = perturbation_weight(sigma, config.rho) if config.schedule == "noise_aware" else 1.0
        cond = Conditioning.blend(c_opt, c_orig, weights * gamma)
        sigma_batch = torch.full((x.shape[0],), sigma, device=device)
        with autocast():
            v = model.velocity(x.to(model.transformer.dtype), sigma_batch, cond.prompt_embeds, cond.pooled)
        return v.float()

    return ode_sample(velocity, x1, sigmas, method=config.sampler)


def iterate_chunks(plan: RolloutPlan, batch_size: int) -> Iterator[torch.Tensor]:
    """Sample indices in rollout order, ``batch_size`` at a time."""
    order = torch.arange(len(plan))
    yield from order.split(batch_size)


def sample_conditions(
    indices: torch.Tensor, plan: RolloutPlan, c_orig: Conditioning, c_opt: Conditioning | None
) -> tuple[Conditioning, Conditioning, torch.Tensor]:
    """C_orig, C_opt and the perturbed mask (all per sample) for sample ``indices``.

    ``c_opt`` holds the variants flattened prompt-major: variant v of prompt p is row p·M + v. For
    samples generated with C_orig the returned C_opt is C_orig too, so any blend of the two is C_orig.
    """
    p = plan.prompt_index[indices]
    variant = plan.variant_index[indices]
    perturbed = variant >= 0
    orig = c_orig[p.to(c_orig.pooled.device)]
    if c_opt is None or not bool(perturbed.any()):
        return orig, orig, torch.zeros_like(perturbed)
    num_m = len(c_opt) // len(c_orig)
    rows = torch.where(perturbed, p * num_m + variant.clamp(min=0), 0)
    opt = c_opt[rows.to(c_opt.pooled.device)]
    keep = perturbed.to(opt.pooled.device)
    opt = Conditioning(
        torch.where(keep.view(-1, 1, 1), opt.prompt_embeds, orig.prompt_embeds),
        torch.where(keep.view(-1, 1), opt.pooled, orig.pooled),
    )
    return orig, opt, perturbed
