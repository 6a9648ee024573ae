"""Deterministic ODE samplers for rectified flow, and E2PO's noise-aware condition schedule.

Model convention (REFERENCE §1): x_σ = (1 − σ)·x0 + σ·ε, the model predicts the velocity v = ε − x0,
and its data prediction is x0̂ = x − σ·v. Sampling integrates dx/dσ = v from σ = 1 (noise) to σ = 0 on a
given grid — the scheduler's own shifted grid, ``scheduler.set_timesteps(n); scheduler.sigmas`` (n + 1
values ending in 0) — which this module does not re-derive. The caller evaluates the transformer with
``timestep = σ·1000``; the sampler only needs σ.

Methods:
- ``euler``: x_{i+1} = x_i + (σ_{i+1} − σ_i)·v_i, the update of diffusers' FlowMatchEulerDiscreteScheduler.
- ``dpm2m``: DPM-Solver++(2M) in data-prediction form with α = 1 − σ, λ = log(α/σ), as DiffusionNFT
  samples its rollouts: the first and the last step are first order, the others second order (the step
  right after σ = 1 is first order too, see :func:`_dpm_steps`). On the 10-step SD3 grid the step from
  σ ≈ 0.28 to σ ≈ 0.009 spans a λ interval ≈ 4.6× the previous one and extrapolates x0̂ with weight
  1/(2r) ≈ 2.3; on unit-variance Gaussian data this makes 10-step DPM-Solver++(2M) less accurate than
  10-step Euler, while from ~40 steps on its second order wins (tests/test_sampler.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

T = TypeVar("T", float, torch.Tensor)


@dataclass(frozen=True)
class _DPMStep:
    """x_{i+1} = x_scale·x_i + d_scale·D, D = (1 + prev_weight)·x0̂_i − prev_weight·x0̂_{i−1}."""

    x_scale: float
    d_scale: float
    prev_weight: float  # 1/(2r); 0 makes the step first order


def _dpm_steps(sigmas: list[float]) -> list[_DPMStep]:
    """Coefficients of DPM-Solver++(2M) on the grid, in float64 (DPM-Solver++ paper, Alg. 2).

    With α = 1 − σ, λ = log(α/σ) and h_i = λ_{i+1} − λ_i, the step from σ_i to σ_{i+1} is
    x_{i+1} = (σ_{i+1}/σ_i)·x_i + (α_{i+1} − α_i·σ_{i+1}/σ_i)·D, which is the textbook
    (σ_{i+1}/σ_i)·x_i − α_{i+1}·(e^{−h_i} − 1)·D written without logarithms, so it stays finite at
    σ = 1 (α = 0, λ = −∞) and σ = 0 (λ = +∞). The second-order D uses r = h_{i−1}/h_i, i.e.
    1/(2r) = h_i/(2·h_{i−1}). Where h_{i−1} is infinite — the step right after σ = 1 — 1/(2r) → 0 and
    the step is first order; that limit is taken exactly here (diffusers' DPMSolverMultistepScheduler
    reaches the same through inf arithmetic). The last step is first order as in DiffusionNFT; when it
    ends at σ = 0 its h is infinite and a second-order D would not even be defined.
    """
    num_steps = len(sigmas) - 1
    steps = []
    for i in range(num_steps):
        s0, s1 = sigmas[i], sigmas[i + 1]
        a0, a1 = 1.0 - s0, 1.0 - s1
        x_scale = s1 / s0
        d_scale = a1 - a0 * x_scale
        prev_weight = 0.0
        second_order = 0 < i < num_steps - 1 and sigmas[i - 1] < 1.0
        if second_order:
            lam_prev, lam0, lam1 = (math.log((1.0 - s) / s) for s in (sigmas[i - 1], s0, s1))
            prev_weight = (lam1 - lam0) / (2.0 * (lam0 - lam_prev))
        steps.append(_DPMStep(x_scale=x_scale, d_scale=d_scale, prev_weight=prev_weight))
    return steps


class FlowODESampler:
    """Scheduler-like stepper on a fixed σ grid: ``step(i, x, v)`` for i = 0 … num_steps − 1.

    DPM-Solver++(2M) remembers the previous step's x0̂, so one instance follows one trajectory (one
    batch) at a time: call the steps in order, and :meth:`reset` (or build a new instance) before the
    next batch.

    Args:
        sigmas: (n + 1,) strictly decreasing grid in [0, 1], normally ``scheduler.sigmas``.
        method: ``dpm2m`` (DPM-Solver++(2M), DiffusionNFT's rollout sampler) or ``euler``.
    """

    def __init__(self, sigmas: torch.Tensor, method: Literal["dpm2m", "euler"] = "dpm2m") -> None:
        sigmas = torch.as_tensor(sigmas).detach().cpu()
        if sigmas.ndim != 1 or sigmas.numel() < 2:
            raise ValueError(f"sigmas must be 1-D with at least 2 values, got shape {tuple(sigmas.shape)}")
        values = sigmas.double().tolist()
        if not (values[0] <= 1.0 and values[-1] >= 0.0 and all(a > b for a, b in itertools.pairwise(values))):
            raise ValueError(f"sigmas must decrease strictly within [0, 1], got {values}")
        if method not in ("dpm2m", "euler"):
            raise ValueError(f"method must be 'dpm2m' or 'euler', got {method!r}")
        self.sigmas = sigmas
        self.method = method
        self.num_steps = sigmas.numel() - 1
        # Euler's dt is the difference taken in the grid's own dtype, as the diffusers scheduler takes it,
        # so that a float32 grid gives bit-identical updates.
        self._euler_dt = (sigmas[1:] - sigmas[:-1]).tolist()
        self._dpm = _dpm_steps(values)
        self.reset()

    @property
    def timesteps(self) -> torch.Tensor:
        """(n,) the transformer's timestep argument at each step, σ_i·1000."""
        return self.sigmas[:-1] * 1000.0

    def sigma(self, i: int) -> float:
        """σ_i, the noise level at which step i evaluates the model."""
        return float(self.sigmas[i])

    def reset(self) -> None:
        """Forget the trajectory, ready for step 0 of a new batch."""
        self._next_step = 0
        self._prev_x0: torch.Tensor | None = None

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Advance from σ_i to σ_{i+1}.

        Args:
            i: step index; steps must come in order 0, 1, …, num_steps − 1.
            x: (B, ...) current sample x_{σ_i}.
            v: (B, ...) model velocity at (x, σ_i).

        Returns:
            (B, ...) x_{σ_{i+1}} in x's dtype. Arithmetic runs in at least float32 (float64 stays float64):
            the updates add small increments to O(1) latents, which half precision would round away.
        """
        if i != self._next_step:
            raise ValueError(
                f"expected step {self._next_step} (steps run in order; reset() between batches), got {i}"
            )
        if x.shape != v.shape:
            raise ValueError(f"x and v must have the same shape, got {tuple(x.shape)} and {tuple(v.shape)}")
        compute = torch.promote_types(torch.promote_types(x.dtype, v.dtype), torch.float32)
        x_c, v_c = x.to(compute), v.to(compute)
        if self.method == "euler":
            x_next = x_c + self._euler_dt[i] * v_c
        else:
            coef = self._dpm[i]
            x0_pred = x_c - self.sigma(i) * v_c
            data = x0_pred
            if coef.prev_weight != 0.0:
                assert self._prev_x0 is not None, "a second-order step always follows a stored x0 prediction"
                data = (1.0 + coef.prev_weight) * x0_pred - coef.prev_weight * self._prev_x0
            x_next = coef.x_scale * x_c + coef.d_scale * data
            self._prev_x0 = x0_pred
        self._next_step = i + 1
        return x_next.to(x.dtype)


def sample(
    velocity_fn: Callable[[torch.Tensor, float], torch.Tensor],
    x1: torch.Tensor,
    sigmas: torch.Tensor,
    method: Literal["dpm2m", "euler"] = "dpm2m",
) -> torch.Tensor:
    """Integrate from x1 at σ_0 to σ_n with :class:`FlowODESampler`.

    Args:
        velocity_fn: (x (B, ...), σ) → v (B, ...), the model velocity at noise level σ.
        x1: (B, ...) starting sample, pure noise when σ_0 = 1.
        sigmas: (n + 1,) grid, as for :class:`FlowODESampler`.

    Returns:
        (B, ...) the sample at σ_n (the clean x0 when the grid ends at 0), in x1's dtype.
    """
    sampler = FlowODESampler(sigmas, method)
    x = x1
    for i in range(sampler.num_steps):
        x = sampler.step(i, x, velocity_fn(x, sampler.sigma(i)))
    return x


# -- E2PO's noise-aware condition schedule ---------------------------------------------------------


def perturbation_weight(sigma: T, rho: float = 0.4) -> T:
    """γ(σ) = clip((σ − (1 − ρ))/ρ, 0, 1), E2PO paper Eq. 13 (REFERENCE §3).

    The perturbed condition acts only while σ > 1 − ρ (the layout-forming, high-noise steps) and fades
    linearly to the original one; ρ = 0.4 gives γ = 1 at σ = 1, 0.5 at σ = 0.8, 0 for σ ≤ 0.6.

    Args:
        sigma: noise level in [0, 1], a float or a tensor of any shape.
        rho: width ρ in (0, 1] of the perturbed band.

    Returns:
        γ, same type (and shape) as ``sigma``.
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if isinstance(sigma, torch.Tensor):
        return ((sigma - (1.0 - rho)) / rho).clamp(0.0, 1.0)
    return min(max((sigma - (1.0 - rho)) / rho, 0.0), 1.0)


def blend_condition(c_opt: torch.Tensor, c_orig: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """C(t) = γ·C_opt + (1 − γ)·C_orig, E2PO paper Eq. 13 (REFERENCE §3).

    Applies to ``prompt_embeds`` (B, S, D) and ``pooled_projections`` (B, P) alike.

    Args:
        c_opt: optimised (perturbed) condition; c_orig: the original condition, same shape.
        gamma: γ from :func:`perturbation_weight`, a float or a tensor broadcastable to the condition.

    Returns:
        The blended condition in c_orig's dtype, computed in at least float32 so that an fp16 condition
        is rounded once.
    """
    if c_opt.shape != c_orig.shape:
        raise ValueError(
            f"c_opt and c_orig must have the same shape, got {tuple(c_opt.shape)} and {tuple(c_orig.shape)}"
        )
    compute = torch.promote_types(c_orig.dtype, torch.float32)
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(device=c_orig.device, dtype=compute)
    blended = gamma * c_opt.to(compute) + (1.0 - gamma) * c_orig.to(compute)
    return blended.to(c_orig.dtype)
