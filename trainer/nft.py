"""DiffusionNFT objective: group advantages, optimality probability, the NFT loss and the policy schedules.

Every formula follows REFERENCE.md §2 (DiffusionNFT as E2PO runs it); NFTConfig holds its settings. The
functions are pure: tensors in, tensors out, no optimiser, adapter or distributed state; the training
loop owns those.

Notation: ``nft_beta`` is the NFT guidance strength β of the implicit positive/negative policies,
``kl_weight`` the weight of the velocity-space KL to the base model, ``adv_clip`` the advantage clip that
also scales the policy loss (Z_c = adv_clip·std in the paper's Eq. 3).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from trainer.validation import check, check_literals, positive


@dataclass(kw_only=True)
class NFTConfig:
    """DiffusionNFT objective (REFERENCE §2)."""

    nft_beta: float = 1.0
    """β: guidance strength of the implicit positive and negative policies v^± (DiffusionNFT's default
    1.0; REFERENCE §2). The policy loss is divided by it."""
    kl_weight: float = 1e-4
    """Weight of the velocity-space KL, mean (v_θ − v_ref)², to the base model (Table 3: KL 1e-4); 0
    skips the reference forward."""
    adv_clip: float = 5.0
    """c: advantages are clipped to ±c before r = A/(2c) + 0.5, and c scales the policy loss (Z_c = c·std
    in the paper's Eq. 3; DiffusionNFT: 5)."""
    std_mode: Literal["global", "group"] = "global"
    """Advantage scale: the std over all of an iteration's samples (DiffusionNFT's ``global_std=True``) or
    each prompt group's own std."""
    old_decay: Literal["linear", "none", "ocr"] = "linear"
    """Schedule of d in θ_old ← d·θ_old + (1 − d)·θ after each iteration: ``linear`` min(0.001·step, 0.5)
    (DiffusionNFT's default), ``none`` θ_old = θ, ``ocr`` DiffusionNFT's OCR schedule
    (:func:`old_policy_decay`)."""
    train_timestep_fraction: float = 0.99
    """Train on the first int(fraction·steps) of each sample's shuffled sampler timesteps (9 of 10, as
    DiffusionNFT computes it)."""
    ema: bool = True
    """Keep the EMA of θ, decay min((1 + s)/(10 + s), 0.9), that evaluation and exported weights use
    (Table 3: EMA on)."""

    def __post_init__(self) -> None:
        check_literals("nft", self)
        positive("nft", self, "nft_beta", "adv_clip")
        positive("nft", self, "kl_weight", strict=False)
        fraction = self.train_timestep_fraction
        check("nft", "train_timestep_fraction", fraction, 0 < fraction <= 1, "in (0, 1]")


# Lower bound of the per-sample loss normaliser w± (REFERENCE §2).
WEIGHT_FLOOR = 1e-5


# -- rewards → advantages ------------------------------------------------------------------------------


def _as_float64(rewards: np.ndarray | torch.Tensor, group_keys: Sequence[str]) -> torch.Tensor:
    values = torch.as_tensor(rewards).detach().to(torch.float64)
    if values.ndim != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(values.shape)}")
    if len(group_keys) != values.numel():
        raise ValueError(f"need one group key per reward: {values.numel()} rewards, {len(group_keys)} keys")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("rewards contain NaN or inf; refusing to turn them into advantages")
    return values


def _group_index(group_keys: Sequence[str], device: torch.device) -> tuple[torch.Tensor, int]:
    """Index (N,) int64 of each sample's group, in order of first appearance, and the number of groups."""
    first_seen: dict[str, int] = {}
    index = [first_seen.setdefault(key, len(first_seen)) for key in group_keys]
    return torch.tensor(index, dtype=torch.int64, device=device), len(first_seen)


def _group_moments(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, ...]:
    """Per-group mean (G,), population std (G,), and whether all of a group's values are equal (G,) bool.

    The mean is taken around the group's minimum, m + mean(R − m): a group of identical rewards then has
    exactly zero deviations (a plain sum of three 0.1s divided by 3 is not 0.1), so its advantages are
    exactly 0 and its r exactly 0.5, and the subtraction of a large common offset loses no precision.
    """
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    counts.index_add_(0, index, torch.ones_like(values))
    offset = torch.full((num_groups,), math.inf, dtype=values.dtype, device=values.device)
    offset = offset.scatter_reduce(0, index, values, reduce="amin")
    maximum = torch.full((num_groups,), -math.inf, dtype=values.dtype, device=values.device)
    maximum = maximum.scatter_reduce(0, index, values, reduce="amax")
    shifted = values - offset[index]
    mean_shift = torch.zeros_like(counts).index_add_(0, index, shifted) / counts
    deviation = shifted - mean_shift[index]
    variance = torch.zeros_like(counts).index_add_(0, index, deviation**2) / counts
    return offset + mean_shift, variance.sqrt(), maximum == offset


def group_advantages(
    rewards: np.ndarray | torch.Tensor,
    group_keys: Sequence[str],
    *,
    std_mode: Literal["global", "group"] = "global",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-relative advantages A_i = (R_i − mean_group(R)) / (std + eps), REFERENCE §2.

    Args:
        rewards: (N,) rewards of one iteration, gathered over all ranks.
        group_keys: N keys; samples with the same key (the prompt text) form one group.
        std_mode: ``global`` divides by the std over all N samples (DiffusionNFT's ``global_std=True``);
            ``group`` by the std of the sample's own group.
        eps: added to the std so that zero-variance data gives finite advantages.

    Returns:
        (N,) float64 advantages, on the rewards' device (CPU for numpy input). Stds are population stds
        (ddof = 0), as numpy computes them upstream. A group whose rewards are all equal gets exactly 0.
    """
    values = _as_float64(rewards, group_keys)
    index, num_groups = _group_index(group_keys, values.device)
    group_mean, group_std, _ = _group_moments(values, index, num_groups)
    if std_mode == "global":
        scale = (values - values.mean()).pow(2).mean().sqrt()
    elif std_mode == "group":
        scale = group_std[index]
    else:
        raise ValueError(f"std_mode must be 'global' or 'group', got {std_mode!r}")
    return (values - group_mean[index]) / (scale + eps)


def group_stats(rewards: np.ndarray | torch.Tensor, group_keys: Sequence[str]) -> dict[str, float]:
    """Diagnostics of the reward groups that DiffusionNFT logs (REFERENCE §2).

    Args:
        rewards: (N,) rewards; group_keys: N group keys, as for :func:`group_advantages`.

    Returns:
        ``zero_std_ratio``: fraction of groups whose rewards are all exactly equal — the groups whose
        std is 0 in exact arithmetic and whose samples therefore carry no learning signal. Equality is
        tested on the values themselves (max == min), not as ``std == 0`` on a float std, which for e.g.
        three rewards of 0.1 comes out ≈1e-17 and would miss the group; no tolerance is needed.
        ``group_std_mean``: mean over groups of the population std of the group's rewards.
        ``reward_mean``, ``reward_std``: mean and population std over all N rewards.
        ``num_groups``: number of distinct keys.
    """
    values = _as_float64(rewards, group_keys)
    index, num_groups = _group_index(group_keys, values.device)
    _, group_std, constant = _group_moments(values, index, num_groups)
    return {
        "zero_std_ratio": constant.double().mean().item(),
        "group_std_mean": group_std.mean().item(),
        "reward_mean": values.mean().item(),
        "reward_std": (values - values.mean()).pow(2).mean().sqrt().item(),
        "num_groups": float(num_groups),
    }


def optimality_probability(advantages: torch.Tensor, *, adv_clip: float = 5.0) -> torch.Tensor:
    """r = clamp(clip(A, −c, c)/(2c) + 0.5, 0, 1) with c = ``adv_clip`` (REFERENCE §2; paper Eq. 3).

    With c = 5 this is clip(A, −5, 5)/10 + 0.5; A = 0 gives r = 0.5.

    Args:
        advantages: (N,) advantages, any float dtype.

    Returns:
        (N,) optimality probabilities in [0, 1], same dtype and device.
    """
    if adv_clip <= 0:
        raise ValueError(f"adv_clip must be positive, got {adv_clip}")
    clipped = advantages.clamp(-adv_clip, adv_clip)
    return (clipped / (2.0 * adv_clip) + 0.5).clamp(0.0, 1.0)


# -- the NFT loss -----------------------------------------------------------------------------------


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) → (B,): mean over every dimension but the batch."""
    return x.flatten(1).mean(dim=1)


def _weighted_x0_error(x0_pred: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L = mean((x0̂ − x0)²)/w with w = stopgrad(mean|x0̂ − x0|) ≥ 1e-5, per sample (REFERENCE §2).

    Args:
        x0_pred: (B, C, H, W) float32, carries the gradient; x0: (B, C, H, W) float32.

    Returns:
        L (B,) float32 and w (B,) float64.
    """
    # w divides the whole sample's loss and can be as small as 1e-5, so its relative error becomes the
    # loss's relative error; float64 on a (B,)-sized reduction makes it exact to the inputs for free.
    weight = _per_sample_mean((x0_pred.detach().double() - x0.double()).abs()).clamp_min(WEIGHT_FLOOR)
    squared = _per_sample_mean((x0_pred - x0) ** 2)
    return squared / weight.to(squared.dtype), weight


def nft_loss(
    *,
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    nft_beta: float = 1.0,
    adv_clip: float = 5.0,
    v_ref: torch.Tensor | None = None,
    kl_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT loss for one training timestep (REFERENCE §2; DiffusionNFT paper Eq. 6–8).

    v⁺ = β·v_θ + (1 − β)·v_old,  v⁻ = (1 + β)·v_old − β·v_θ,  x0^± = x_t − t·v^±,
    L^± = mean((x0^± − x0)²) / stopgrad(mean|x0^± − x0|),
    loss = mean_batch(c·[r·L⁺ + (1 − r)·L⁻]/β) + kl_weight·mean_batch(mean((v_θ − v_ref)²)),
    with β = ``nft_beta``, c = ``adv_clip`` and means over (C, H, W).

    Args:
        v_theta: (B, C, H, W) velocity of the training policy; the only input the gradient flows into.
        v_old: (B, C, H, W) velocity of the old (sampling) policy, no grad.
        x_t: (B, C, H, W) noised latent (1 − t)·x0 + t·ε; x0: (B, C, H, W) the rollout's clean latent.
        t: (B,) flow time in [0, 1] (t = 1 is noise).
        r: (B,) optimality probability from :func:`optimality_probability`.
        nft_beta: β > 0. adv_clip: c, the policy-loss scale (5 as DiffusionNFT).
        v_ref: (B, C, H, W) base-model velocity, no grad; required when ``kl_weight > 0``.
        kl_weight: weight of the KL term.

    Returns:
        The scalar float32 loss, and detached float32 diagnostics: ``policy_loss``; ``kl``;
        ``old_deviate`` = mean((v_θ − v_old)²) over all elements; ``x0_norm`` = mean over the batch of the
        per-sample L2 norm ‖x0‖ over (C, H, W); ``w_plus_mean``, ``w_minus_mean`` = batch means of w^±.

    Inputs may be bf16/fp16 (autocast forwards). Everything is upcast to float32 before v^± is formed:
    x0^± − x0 = t·(ε − x0 − v^±) is a small difference of O(1) terms, which an 8- or 11-bit mantissa
    would mostly cancel away, and the squared errors are then averaged over C·H·W elements.
    """
    if nft_beta <= 0:
        raise ValueError(f"nft_beta must be positive (the loss divides by it), got {nft_beta}")
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be non-negative, got {kl_weight}")
    if kl_weight > 0 and v_ref is None:
        raise ValueError(f"kl_weight = {kl_weight} needs v_ref (the base model's velocity), got None")
    if v_ref is not None and kl_weight == 0:
        warnings.warn("nft_loss: v_ref is ignored because kl_weight == 0", stacklevel=2)
    shape = v_theta.shape
    for name, tensor in (("v_old", v_old), ("x_t", x_t), ("x0", x0)):
        if tensor.shape != shape:
            raise ValueError(f"{name} must have v_theta's shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if t.shape != shape[:1] or r.shape != shape[:1]:
        raise ValueError(f"t and r must be ({shape[0]},), got {tuple(t.shape)} and {tuple(r.shape)}")

    f32 = torch.float32
    v_theta32, v_old32 = v_theta.to(f32), v_old.detach().to(f32)
    x_t32, x0_32 = x_t.detach().to(f32), x0.detach().to(f32)
    t32 = t.detach().to(f32).view(-1, *([1] * (len(shape) - 1)))
    r32 = r.detach().to(f32)

    v_plus = nft_beta * v_theta32 + (1.0 - nft_beta) * v_old32
    v_minus = (1.0 + nft_beta) * v_old32 - nft_beta * v_theta32
    loss_plus, w_plus = _weighted_x0_error(x_t32 - t32 * v_plus, x0_32)
    loss_minus, w_minus = _weighted_x0_error(x_t32 - t32 * v_minus, x0_32)
    policy_loss = (adv_clip * (r32 * loss_plus + (1.0 - r32) * loss_minus) / nft_beta).mean()

    if v_ref is not None and kl_weight > 0:
        kl = _per_sample_mean((v_theta32 - v_ref.detach().to(f32)) ** 2).mean()
    else:
        kl = torch.zeros((), dtype=f32, device=v_theta.device)
    loss = policy_loss + kl_weight * kl

    parts = {
        "policy_loss": policy_loss.detach(),
        "kl": kl.detach(),
        "old_deviate": ((v_theta32.detach() - v_old32) ** 2).mean(),
        "x0_norm": x0_32.flatten(1).norm(dim=1).mean(),
        "w_plus_mean": w_plus.mean().to(f32),
        "w_minus_mean": w_minus.mean().to(f32),
    }
    return loss, parts


# -- schedules of the old policy and the EMA -------------------------------------------------------


def _linear_decay(step: int) -> float:
    return min(0.001 * step, 0.5)


def _no_decay(step: int) -> float:
    return 0.0


def _ocr_decay(step: int) -> float:
    return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)


OLD_POLICY_DECAYS: dict[str, Callable[[int], float]] = {
    "linear": _linear_decay,
    "none": _no_decay,
    "ocr": _ocr_decay,
}


def old_policy_decay(step: int, schedule: Literal["linear", "none", "ocr"] = "linear") -> float:
    """Decay d of θ_old ← d·θ_old + (1 − d)·θ after optimiser step ``step`` (REFERENCE §2).

    ``linear`` (DiffusionNFT default): d = min(0.001·step, 0.5). ``none``: d = 0, θ_old = θ.
    ``ocr`` (DiffusionNFT's OCR config): 0 until step 75, then min(0.0075·(step − 75), 0.999).
    """
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    try:
        decay = OLD_POLICY_DECAYS[schedule]
    except KeyError:
        raise ValueError(f"schedule must be one of {list(OLD_POLICY_DECAYS)}, got {schedule!r}") from None
    return decay(step)


def ema_decay(step: int) -> float:
    """Decay of the evaluation EMA of θ at optimiser step s: min((1 + s)/(10 + s), 0.9) (REFERENCE §2)."""
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    return min((1 + step) / (10 + step), 0.9)


@torch.no_grad()
def blend_(target: Iterable[torch.Tensor], source: Iterable[torch.Tensor], decay: float) -> None:
    """In place, target ← decay·target + (1 − decay)·source, pairwise over the two iterables.

    Used for θ_old ← d·θ_old + (1 − d)·θ and for the EMA. The blend is computed in at least float32 and
    written back in the target's dtype, so a bf16/fp16 target is rounded once rather than twice and a
    source of another dtype or device is accepted.

    Args:
        target: tensors updated in place (e.g. the old adapter's parameters), floating point.
        source: tensors of the same shapes, in the same order (e.g. the training adapter's parameters).
        decay: in [0, 1]; 0 copies the source, 1 leaves the target unchanged.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    for dst, src in zip(target, source, strict=True):
        if not dst.is_floating_point():
            raise ValueError(f"blend_ needs floating-point targets, got {dst.dtype}")
        if dst.shape != src.shape:
            raise ValueError(f"blend_ shape mismatch: target {tuple(dst.shape)}, source {tuple(src.shape)}")
        compute = torch.promote_types(dst.dtype, torch.float32)
        blended = decay * dst.to(compute) + (1.0 - decay) * src.to(device=dst.device, dtype=compute)
        dst.copy_(blended)
