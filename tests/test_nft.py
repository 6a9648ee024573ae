"""DiffusionNFT math (trainer/nft.py) against hand computations of REFERENCE.md §2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.nft import (
    blend_,
    ema_decay,
    group_advantages,
    group_stats,
    nft_loss,
    old_policy_decay,
    optimality_probability,
)

# Three groups: a varied group, a zero-variance group, a two-sample group.
REWARDS = [1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 4.0]
KEYS = ["a", "a", "a", "b", "b", "b", "c", "c"]
# Over all 8 rewards: mean 25/8 = 3.125; squared deviations sum to 26.875, so the population variance
# is 26.875/8 = 3.359375 (the unbiased one would be 26.875/7).
GLOBAL_STD = math.sqrt(3.359375)


# -- advantages ----------------------------------------------------------------------------------------


def test_global_std_advantages_by_hand():
    adv = group_advantages(np.array(REWARDS), KEYS)
    scale = GLOBAL_STD + 1e-4
    expected = [-1 / scale, 0.0, 1 / scale, 0.0, 0.0, 0.0, -2 / scale, 2 / scale]
    assert adv.dtype == torch.float64 and adv.shape == (8,)
    assert adv.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # Population std, not the unbiased one.
    unbiased = math.sqrt(26.875 / 7)
    assert adv[0].item() != pytest.approx(-1 / (unbiased + 1e-4), rel=1e-6)


def test_group_std_advantages_by_hand():
    adv = group_advantages(torch.tensor(REWARDS, dtype=torch.float32), KEYS, std_mode="group")
    std_a = math.sqrt(2 / 3)  # deviations −1, 0, 1 over 3 samples
    std_c = 2.0  # deviations −2, 2 over 2 samples
    expected = [
        -1 / (std_a + 1e-4),
        0.0,
        1 / (std_a + 1e-4),
        0.0,  # zero-variance group: 0/(0 + eps)
        0.0,
        0.0,
        -2 / (std_c + 1e-4),
        2 / (std_c + 1e-4),
    ]
    assert adv.dtype == torch.float64
    assert adv.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_advantages_follow_keys_not_order():
    order = [6, 0, 3, 7, 1, 4, 2, 5]
    shuffled = group_advantages([REWARDS[i] for i in order], [KEYS[i] for i in order])
    reference = group_advantages(REWARDS, KEYS)
    assert shuffled.tolist() == pytest.approx([reference[i].item() for i in order], rel=1e-12, abs=1e-15)


def test_identical_rewards_give_exactly_zero_advantage_and_half_r():
    # 0.1 + 0.1 + 0.1 = 0.30000000000000004 in float64, so a naive mean leaves a 1e-17 residue.
    rewards = [0.1, 0.1, 0.1, 0.3, 0.7]
    keys = ["p", "p", "p", "q", "q"]
    for mode in ("global", "group"):
        adv = group_advantages(rewards, keys, std_mode=mode)
        assert adv[:3].tolist() == [0.0, 0.0, 0.0]
        assert optimality_probability(adv)[:3].tolist() == [0.5, 0.5, 0.5]


def test_group_stats_by_hand():
    stats = group_stats(REWARDS, KEYS)
    assert stats["num_groups"] == 3
    assert stats["zero_std_ratio"] == pytest.approx(1 / 3)
    assert stats["group_std_mean"] == pytest.approx((math.sqrt(2 / 3) + 0.0 + 2.0) / 3, rel=1e-12)
    assert stats["reward_mean"] == pytest.approx(3.125, rel=1e-12)
    assert stats["reward_std"] == pytest.approx(GLOBAL_STD, rel=1e-12)
    # Equal-valued groups count as zero-std even where a float std would come out ≈1e-17.
    assert group_stats([0.1, 0.1, 0.1, 0.3, 0.7], ["p", "p", "p", "q", "q"])["zero_std_ratio"] == 0.5


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="one group key per reward"):
        group_advantages([1.0, 2.0], ["a"])
    with pytest.raises(ValueError, match="NaN"):
        group_advantages([1.0, float("nan")], ["a", "a"])
    with pytest.raises(ValueError, match="std_mode"):
        group_advantages([1.0, 2.0], ["a", "a"], std_mode="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(np.ones((2, 2)), ["a"] * 4)


def test_optimality_probability_clips():
    adv = torch.tensor([-10.0, -5.0, -1.0, 0.0, 2.5, 5.0, 7.0], dtype=torch.float64)
    # clip(A, −5, 5)/10 + 0.5
    assert optimality_probability(adv).tolist() == pytest.approx([0.0, 0.0, 0.4, 0.5, 0.75, 1.0, 1.0])
    # c = 2: clip(A, −2, 2)/4 + 0.5
    assert optimality_probability(adv, adv_clip=2.0).tolist() == pytest.approx([0, 0, 0.25, 0.5, 1, 1, 1])
    with pytest.raises(ValueError):
        optimality_probability(adv, adv_clip=0.0)


# -- the NFT loss --------------------------------------------------------------------------------------


def _inputs(seed: int = 0, batch: int = 2, shape: tuple[int, ...] = (2, 2, 3)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, *shape, generator=g)
    eps = torch.randn(batch, *shape, generator=g)
    t = torch.tensor([0.3, 0.8][:batch])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_old = eps - x0 + 0.3 * torch.randn(batch, *shape, generator=g)
    v_theta = v_old + 0.2 * torch.randn(batch, *shape, generator=g)
    v_ref = eps - x0 + 0.4 * torch.randn(batch, *shape, generator=g)
    r = torch.tensor([0.9, 0.2][:batch])
    return {"v_theta": v_theta, "v_old": v_old, "x_t": x_t, "x0": x0, "t": t, "r": r, "v_ref": v_ref}


def _flat(x: torch.Tensor, b: int) -> list[float]:
    return x[b].double().flatten().tolist()


def _hand_loss(inp, beta, adv_clip, kl_weight):
    """REFERENCE §2 loss, element by element in plain Python floats."""
    batch = inp["x0"].shape[0]
    policy, kl, w_plus_all, w_minus_all = 0.0, 0.0, [], []
    for b in range(batch):
        vt, vo, xt, x0 = (_flat(inp[k], b) for k in ("v_theta", "v_old", "x_t", "x0"))
        t, r = inp["t"][b].item(), inp["r"][b].item()
        n = len(x0)
        e_plus = [xt[j] - t * (beta * vt[j] + (1 - beta) * vo[j]) - x0[j] for j in range(n)]
        e_minus = [xt[j] - t * ((1 + beta) * vo[j] - beta * vt[j]) - x0[j] for j in range(n)]
        w_plus = max(sum(abs(e) for e in e_plus) / n, 1e-5)
        w_minus = max(sum(abs(e) for e in e_minus) / n, 1e-5)
        loss_plus = sum(e * e for e in e_plus) / n / w_plus
        loss_minus = sum(e * e for e in e_minus) / n / w_minus
        policy += adv_clip * (r * loss_plus + (1 - r) * loss_minus) / beta / batch
        if kl_weight > 0:
            vr = _flat(inp["v_ref"], b)
            kl += sum((vt[j] - vr[j]) ** 2 for j in range(n)) / n / batch
        w_plus_all.append(w_plus)
        w_minus_all.append(w_minus)
    return policy + kl_weight * kl, policy, kl, sum(w_plus_all) / batch, sum(w_minus_all) / batch


@pytest.mark.parametrize("beta", [1.0, 0.1])
@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
def test_nft_loss_matches_scalar_recomputation(beta, kl_weight):
    inp = _inputs()
    v_ref = inp["v_ref"] if kl_weight > 0 else None
    loss, parts = nft_loss(
        v_theta=inp["v_theta"], v_old=inp["v_old"], x_t=inp["x_t"], x0=inp["x0"], t=inp["t"], r=inp["r"],
        nft_beta=beta, adv_clip=5.0, v_ref=v_ref, kl_weight=kl_weight,
    )  # fmt: skip
    total, policy, kl, w_plus, w_minus = _hand_loss(inp, beta, 5.0, kl_weight)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(total, rel=1e-5)
    assert parts["policy_loss"].item() == pytest.approx(policy, rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl, rel=1e-5, abs=1e-12)
    assert parts["w_plus_mean"].item() == pytest.approx(w_plus, rel=1e-5)
    assert parts["w_minus_mean"].item() == pytest.approx(w_minus, rel=1e-5)
    vt, vo = (inp[k].double().flatten().tolist() for k in ("v_theta", "v_old"))
    old_deviate = sum((a - b) ** 2 for a, b in zip(vt, vo, strict=True)) / len(vt)
    assert parts["old_deviate"].item() == pytest.approx(old_deviate, rel=1e-5)
    norms = [math.sqrt(sum(v * v for v in _flat(inp["x0"], b))) for b in range(2)]
    assert parts["x0_norm"].item() == pytest.approx(sum(norms) / 2, rel=1e-5)
    assert all(not p.requires_grad for p in parts.values())


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_gradient_is_analytic_and_only_through_v_theta(beta):
    """dL/dv_θ with w± held constant (stop-grad), derived by hand from REFERENCE §2:
    x0⁺ = x_t − t·(β·v_θ + (1 − β)·v_old) ⇒ ∂x0⁺/∂v_θ = −t·β;
    x0⁻ = x_t − t·((1 + β)·v_old − β·v_θ) ⇒ ∂x0⁻/∂v_θ = +t·β;
    ∂L/∂v_θ = (1/B)·(c/β)·(2/N)·[−r·t·β·(x0⁺ − x0)/w⁺ + (1 − r)·t·β·(x0⁻ − x0)/w⁻]
              + kl_weight·(1/B)·(2/N)·(v_θ − v_ref).
    """
    inp = _inputs(seed=3)
    v_theta = inp["v_theta"].double().requires_grad_(True)
    v_old = inp["v_old"].clone().requires_grad_(True)
    x0 = inp["x0"].clone().requires_grad_(True)
    kl_weight, adv_clip = 0.5, 5.0
    loss, _ = nft_loss(
        v_theta=v_theta, v_old=v_old, x_t=inp["x_t"], x0=x0, t=inp["t"], r=inp["r"],
        nft_beta=beta, adv_clip=adv_clip, v_ref=inp["v_ref"], kl_weight=kl_weight,
    )  # fmt: skip
    loss.backward()
    assert v_old.grad is None and x0.grad is None

    batch = inp["x0"].shape[0]
    for b in range(batch):
        vt, vo, xt, x0b, vr = (_flat(inp[k], b) for k in ("v_theta", "v_old", "x_t", "x0", "v_ref"))
        t, r = inp["t"][b].item(), inp["r"][b].item()
        n = len(vt)
        e_plus = [xt[j] - t * (beta * vt[j] + (1 - beta) * vo[j]) - x0b[j] for j in range(n)]
        e_minus = [xt[j] - t * ((1 + beta) * vo[j] - beta * vt[j]) - x0b[j] for j in range(n)]
        w_plus = max(sum(abs(e) for e in e_plus) / n, 1e-5)
        w_minus = max(sum(abs(e) for e in e_minus) / n, 1e-5)
        policy_scale = (adv_clip / beta) * (2 / n) / batch
        expected = [
            policy_scale * (-r * t * beta * e_plus[j] / w_plus + (1 - r) * t * beta * e_minus[j] / w_minus)
            + kl_weight * (2 / n) / batch * (vt[j] - vr[j])
            for j in range(n)
        ]
        assert v_theta.grad[b].flatten().tolist() == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_weight_floor_when_prediction_is_exact():
    inp = _inputs()
    # t = 0 and x_t = x0 make x0± = x0 exactly: w± hits the 1e-5 floor and the loss is 0, not NaN.
    loss, parts = nft_loss(
        v_theta=inp["v_theta"], v_old=inp["v_old"], x_t=inp["x0"], x0=inp["x0"], t=torch.zeros(2), r=inp["r"]
    )
    assert loss.item() == 0.0
    assert parts["w_plus_mean"].item() == pytest.approx(1e-5) and parts[
        "w_minus_mean"
    ].item() == pytest.approx(1e-5)


def test_half_precision_inputs_are_upcast():
    inp = {k: v.to(torch.bfloat16) for k, v in _inputs(seed=5).items()}
    v_theta = inp["v_theta"].clone().requires_grad_(True)
    kwargs = {k: inp[k] for k in ("v_old", "x_t", "x0", "t", "r", "v_ref")}
    loss, _ = nft_loss(v_theta=v_theta, nft_beta=0.5, kl_weight=0.1, **kwargs)
    loss.backward()
    # The same bf16 values given as float32 give the same float32 loss: all arithmetic is in float32.
    loss32, _ = nft_loss(
        v_theta=inp["v_theta"].float(),
        nft_beta=0.5,
        kl_weight=0.1,
        **{k: v.float() for k, v in kwargs.items()},
    )
    assert loss.dtype == torch.float32 and torch.equal(loss.detach(), loss32)
    assert v_theta.grad is not None and v_theta.grad.dtype == torch.bfloat16


def test_nft_loss_argument_errors():
    inp = _inputs()
    base = {k: inp[k] for k in ("v_theta", "v_old", "x_t", "x0", "t", "r")}
    with pytest.raises(ValueError, match="nft_beta"):
        nft_loss(**base, nft_beta=0.0)
    with pytest.raises(ValueError, match="needs v_ref"):
        nft_loss(**base, kl_weight=1e-4)
    with pytest.raises(ValueError, match="shape"):
        nft_loss(**{**base, "x0": inp["x0"][:1]})
    with pytest.warns(UserWarning, match="v_ref is ignored"):
        _, parts = nft_loss(**base, v_ref=inp["v_ref"], kl_weight=0.0)
    assert parts["kl"].item() == 0.0


# -- schedules and parameter blending -----------------------------------------------------------------


def test_old_policy_decay_schedules():
    linear = {0: 0.0, 1: 0.001, 100: 0.1, 499: 0.499, 500: 0.5, 1000: 0.5}
    for step, d in linear.items():
        assert old_policy_decay(step) == pytest.approx(d)
        assert old_policy_decay(step, "none") == 0.0
    ocr = {0: 0.0, 74: 0.0, 75: 0.0, 76: 0.0075, 175: 0.75, 208: 0.9975, 209: 0.999, 1000: 0.999}
    for step, d in ocr.items():
        assert old_policy_decay(step, "ocr") == pytest.approx(d)
    with pytest.raises(ValueError, match="schedule"):
        old_policy_decay(3, "cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        old_policy_decay(-1)


def test_ema_decay_values():
    # (1 + s)/(10 + s), capped at 0.9 (reached at s = 80).
    expected = {0: 1 / 10, 1: 2 / 11, 10: 11 / 20, 71: 72 / 81, 80: 0.9, 81: 0.9, 1000: 0.9}
    for step, d in expected.items():
        assert ema_decay(step) == pytest.approx(d)


def test_blend_in_place():
    target = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.tensor([[4.0]])]
    source = [torch.tensor([3.0, 6.0]), torch.tensor([[0.0]], dtype=torch.float64)]
    pointers = [p.data_ptr() for p in target]
    blend_(target, source, 0.25)
    # 0.25·1 + 0.75·3, 0.25·2 + 0.75·6, 0.25·4 + 0.75·0
    assert target[0].tolist() == [2.5, 5.0] and target[1].tolist() == [[1.0]]
    assert [p.data_ptr() for p in target] == pointers and target[0].requires_grad
    assert target[1].dtype == torch.float32


def test_blend_extremes_and_half_precision():
    source = [torch.randn(5, generator=torch.Generator().manual_seed(1))]
    target = [torch.zeros(5)]
    blend_(target, source, 0.0)
    assert torch.equal(target[0], source[0])
    kept = target[0].clone()
    blend_(target, [torch.ones(5)], 1.0)
    assert torch.equal(target[0], kept)
    half = [torch.tensor([1.0, -2.0], dtype=torch.bfloat16)]
    blend_(half, [torch.tensor([2.0, 2.0])], 0.5)
    assert half[0].dtype == torch.bfloat16 and half[0].tolist() == [1.5, 0.0]


def test_blend_errors():
    with pytest.raises(ValueError):
        blend_([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)], 0.5)
    with pytest.raises(ValueError, match="shape"):
        blend_([torch.zeros(2)], [torch.zeros(3)], 0.5)
    with pytest.raises(ValueError, match="decay"):
        blend_([torch.zeros(2)], [torch.zeros(2)], 1.5)
