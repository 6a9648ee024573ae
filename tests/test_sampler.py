"""Flow ODE samplers and the noise-aware condition schedule (trainer/sampler.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from trainer.sampler import FlowODESampler, blend_condition, perturbation_weight, sample
from trainer.text import Conditioning


def sd3_sigmas(num_steps: int) -> torch.Tensor:
    """The SD3.5 scheduler's grid (shift 3.0): num_steps + 1 float32 values from 1 to 0."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas


def toy_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A nonlinear, σ-dependent stand-in for the transformer."""
    return torch.sin(3.0 * x) + sigma * x - 0.5


# -- Euler ----------------------------------------------------------------------------------------------


def test_euler_matches_diffusers_step_by_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sampler = FlowODESampler(scheduler.sigmas, method="euler")
    assert torch.equal(sampler.timesteps, scheduler.timesteps)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours, theirs = x0.clone(), x0.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        assert sampler.sigma(i) == pytest.approx(timestep.item() / 1000, rel=1e-6)
        # Each side evaluates the model at its own state, so any drift would compound.
        ours = sampler.step(i, ours, toy_velocity(ours, sampler.sigma(i)))
        theirs = scheduler.step(toy_velocity(theirs, sampler.sigma(i)), timestep, theirs).prev_sample
        assert torch.equal(ours, theirs), f"step {i}"


def test_euler_half_precision_close_to_diffusers():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sampler = FlowODESampler(scheduler.sigmas, method="euler")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for i, timestep in enumerate(scheduler.timesteps):
        v = toy_velocity(x.float(), sampler.sigma(i)).to(torch.bfloat16)
        ours = sampler.step(i, x, v)
        theirs = scheduler.step(v, timestep, x).prev_sample
        assert ours.dtype == torch.bfloat16
        # diffusers rounds dt·v to bf16 before adding it; we add in float32. One bf16 ulp apart at most.
        torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=2**-7)
        x = theirs


# -- DPM-Solver++(2M) against a plain-python loop of the formula ----------------------------------------


def hand_dpm2m(x: float, sigmas: list[float], velocity) -> float:
    """DPM-Solver++(2M) with α = 1 − σ, λ = log(α/σ), written from the formula with logs and exps:
    x_{i+1} = (σ_{i+1}/σ_i)·x_i − α_{i+1}·(e^{−h_i} − 1)·D, first order at the first and last step and
    right after σ = 1 (where h_{i−1} is infinite and 1/(2r) → 0)."""
    n = len(sigmas) - 1
    prev_x0 = None
    for i in range(n):
        s0, s1 = sigmas[i], sigmas[i + 1]
        x0_pred = x - s0 * velocity(x, s0)
        data = x0_pred
        if 0 < i < n - 1 and sigmas[i - 1] < 1.0:
            lam = [math.log((1 - s) / s) for s in (sigmas[i - 1], s0, s1)]
            r = (lam[1] - lam[0]) / (lam[2] - lam[1])
            data = (1 + 1 / (2 * r)) * x0_pred - 1 / (2 * r) * prev_x0
        if s0 == 1.0 or s1 == 0.0:
            # log(α/σ) is infinite here; e^{−h} = α_i·σ_{i+1}/(α_{i+1}·σ_i) taken as its limit.
            x = (s1 / s0) * x + ((1 - s1) - (1 - s0) * s1 / s0) * data
        else:
            h = math.log((1 - s1) / s1) - math.log((1 - s0) / s0)
            x = (s1 / s0) * x - (1 - s1) * (math.exp(-h) - 1) * data
        prev_x0 = x0_pred
    return x


def scalar_velocity(x: float, sigma: float) -> float:
    return math.sin(3.0 * x) + sigma * x - 0.5


@pytest.mark.parametrize(
    "sigmas",
    [
        [1.0, 0.8, 0.5, 0.3, 0.0],  # starts at noise, ends clean
        [0.9, 0.7, 0.5, 0.3, 0.1],  # interior grid: steps 1 and 2 are second order
        [1.0, 0.0],  # a single step
    ],
)
def test_dpm2m_matches_hand_loop(sigmas):
    starts = [-1.3, 0.2, 2.0]
    expected = [hand_dpm2m(x, sigmas, scalar_velocity) for x in starts]
    x1 = torch.tensor(starts, dtype=torch.float64)
    out = sample(lambda x, s: torch.sin(3.0 * x) + s * x - 0.5, x1, torch.tensor(sigmas, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert out.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("method", ["euler", "dpm2m"])
def test_constant_data_prediction_is_recovered_exactly(method):
    """v = (x − x0*)/σ means the model predicts x0̂ = x0* everywhere; both samplers must land on it."""
    g = torch.Generator().manual_seed(2)
    x0_star = torch.randn(2, 4, 8, 8, generator=g)
    x1 = torch.randn(2, 4, 8, 8, generator=g)
    out = sample(lambda x, s: (x - x0_star) / s, x1, sd3_sigmas(10), method)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x0_star, rtol=0, atol=1e-5)


def test_steps_must_run_in_order():
    sampler = FlowODESampler(sd3_sigmas(4))
    x = torch.zeros(1, 2)
    sampler.step(0, x, x)
    with pytest.raises(ValueError, match="expected step 1"):
        sampler.step(2, x, x)
    sampler.reset()
    sampler.step(0, x, x)


def test_grid_validation():
    with pytest.raises(ValueError, match="decrease"):
        FlowODESampler(torch.tensor([1.0, 0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="decrease"):
        FlowODESampler(torch.tensor([1.2, 0.5, 0.0]))
    with pytest.raises(ValueError, match="method"):
        FlowODESampler(sd3_sigmas(4), method="heun")  # type: ignore[arg-type]


# -- convergence on Gaussian data, where the exact flow is known ----------------------------------------

DATA_STD = 1.0  # SD3 latents are normalised to roughly unit variance


def gaussian_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact velocity for data N(0, s²·I): E[x0 | x_σ] = α·s²/(α²·s² + σ²)·x, v = (x − x0̂)/σ."""
    alpha, var = 1.0 - sigma, DATA_STD**2
    return (x - alpha * var / (alpha**2 * var + sigma**2) * x) / sigma


def gaussian_error(method: str, num_steps: int) -> float:
    """Max relative error of x0 against the exact ODE solution, which for Gaussian data rescales the
    marginal std: x_σ = sqrt(α²·s² + σ²)·x1, so x0 = s·x1."""
    x1 = torch.linspace(-3.0, 3.0, 13, dtype=torch.float64)
    out = sample(gaussian_velocity, x1, sd3_sigmas(num_steps).double(), method)
    return ((out - DATA_STD * x1).abs().max() / (DATA_STD * x1.abs().max())).item()


def test_convergence_orders_on_gaussian_data():
    """Doubling the steps on the SD3 grid: Euler's error halves (first order), DPM-Solver++(2M)'s
    shrinks about fourfold (second order). The ratios are taken from 20 steps up, where the grid is fine
    enough for the asymptotic order to show."""
    euler = [gaussian_error("euler", n) for n in (20, 40, 80)]
    dpm = [gaussian_error("dpm2m", n) for n in (20, 40, 80)]
    for coarse, fine in itertools.pairwise(euler):
        assert 1.8 < coarse / fine < 2.2
    for coarse, fine in itertools.pairwise(dpm):
        assert 3.5 < coarse / fine < 5.5
    assert dpm[1] < euler[1] and dpm[2] < euler[2] / 3


# -- noise-aware schedule (Eq. 13) --------------------------------------------------------------------------


def test_perturbation_weight_values():
    expected = {1.0: 1.0, 0.8: 0.5, 0.6: 0.0, 0.5: 0.0, 0.0: 0.0}
    for sigma, gamma in expected.items():
        assert perturbation_weight(sigma, rho=0.4) == pytest.approx(gamma, abs=1e-12)
    as_tensor = perturbation_weight(torch.tensor(list(expected)), rho=0.4)
    assert as_tensor.tolist() == pytest.approx(list(expected.values()), abs=1e-6)
    assert perturbation_weight(0.9, rho=1.0) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        perturbation_weight(0.5, rho=0.0)


def test_blend_condition():
    c_opt = torch.tensor([[2.0, 4.0]], dtype=torch.float16)
    c_orig = torch.tensor([[0.0, 8.0]], dtype=torch.float16)
    assert torch.equal(blend_condition(c_opt, c_orig, 0.0), c_orig)
    assert torch.equal(blend_condition(c_opt, c_orig, 1.0), c_opt)
    mixed = blend_condition(c_opt, c_orig, 0.25)  # 0.25·opt + 0.75·orig
    assert mixed.dtype == torch.float16 and mixed.tolist() == [[0.5, 7.0]]
    assert blend_condition(c_opt, c_orig, torch.tensor(0.5)).tolist() == [[1.0, 6.0]]
    with pytest.raises(ValueError, match="same shape"):
        blend_condition(c_opt, c_orig[:, :1], 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_rollouts_blend_rounds_once_in_half_precision(dtype: torch.dtype) -> None:
    """``Conditioning.blend`` — what the rollout calls on SD3.5-M's fp16 conditions — against float64.

    Each value may be off by the one final rounding to ``dtype`` (half an ulp) plus float32's rounding of
    the two products; computing in ``dtype`` itself rounds γ and each product too and lands further away.
    """
    generator = torch.Generator().manual_seed(0)
    shapes = ((6, 77 + 16, 64), (6, 48))
    c_opt, c_orig = (
        Conditioning(*(torch.randn(s, generator=generator).mul(3).to(dtype) for s in shapes))
        for _ in range(2)
    )
    gamma = torch.tensor([0.0, 1.0, 0.1, 1 / 3, 0.77, 0.5])
    blended = Conditioning.blend(c_opt, c_orig, gamma)
    for got, opt, orig, view in (
        (blended.prompt_embeds, c_opt.prompt_embeds, c_orig.prompt_embeds, (-1, 1, 1)),
        (blended.pooled, c_opt.pooled, c_orig.pooled, (-1, 1)),
    ):
        assert got.dtype == dtype
        g = gamma.double().view(view)
        reference = g * opt.double() + (1 - g) * orig.double()
        info = torch.finfo(dtype)
        binade = torch.exp2(torch.floor(torch.log2(reference.abs().clamp(min=info.smallest_normal))))
        ulp = info.eps * binade  # subnormals share the smallest normal binade's spacing
        terms = (g * opt.double()).abs() + ((1 - g) * orig.double()).abs()  # float32 rounds these
        slack = 0.5 * ulp + 4 * torch.finfo(torch.float32).eps * terms
        assert ((got.double() - reference).abs() <= slack).all()
        assert torch.equal(got[0], orig[0]) and torch.equal(got[1], opt[1])  # γ = 0 and 1 are exact
