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

import torch

from trainer.config import RolloutConfig
from trainer.model import FlowModel
from trainer.sampler import perturbation_weight
from trainer.sampler import sample as ode_sample
from trainer.text import Conditioning


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


def sample_sigmas(model: FlowModel, num_steps: int) -> torch.Tensor:
    """The scheduler's own shifted sigma grid (num_steps + 1 values, 1 → 0)."""
    model.scheduler.set_timesteps(num_steps)
    return model.scheduler.sigmas.detach().float().cpu().clone()


@torch.no_grad()
def sample(
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
