"""E2PO's structural invariants, each checked on a real training run by watching what the loop hands on.

* Decoupled optimisation: the update is conditioned on C_orig (on the generating condition only under
  ``train_condition=generating``), whatever condition generated the sample.
* One advantage group per prompt, spanning all its G·K samples, with the global population std.
* Rollouts sample with θ_old, not θ.
* ``nft_update`` equals a hand computation of the DiffusionNFT loss and an SGD step on a tiny model.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from tests.test_trainer_e2e import run_training, tiny_config
from tests.tiny_sd3 import tiny_model
from trainer import loop
from trainer.model import OLD, POLICY, adapter_named_params, adapter_state, load_adapter_state, use_adapter
from trainer.nft import NFTConfig
from trainer.rollout import denoise, inference_sigmas
from trainer.text import Conditioning
from trainer.update import Learner, OptimConfig, TrainBatch, nft_update, train_sigmas

G, K = 2, 3


@dataclass
class Spy:
    """What each iteration's loop passed between its steps."""

    prompts: list[list[str]] = field(default_factory=list)
    c_opt: list[Conditioning] = field(default_factory=list)
    rollouts: list[Any] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Per rollout chunk: the active adapters, the denoise() arguments, θ and θ_old then, and the output."""
    batches: list[TrainBatch] = field(default_factory=list)


def spied_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **rollout: Any) -> tuple[loop.Trainer, Spy]:
    spy = Spy()
    real_perturb, real_rollout, real_update = loop.Trainer.perturb, loop.Trainer.rollout, loop.nft_update

    def perturb(self: loop.Trainer, prompts: list[str], positions: list[int]):
        result, c_opt = real_perturb(self, prompts, positions)
        spy.prompts.append(list(prompts))
        spy.c_opt.append(c_opt)
        if len(spy.prompts) == 1:  # move θ away from θ_old, so that sampling with the wrong one shows
            with torch.no_grad():
                for p in adapter_named_params(self.model.transformer, POLICY).values():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
        return result, c_opt

    async def spied_rollout(self: loop.Trainer, records, c_orig, c_opt, positions):
        out = await real_rollout(self, records, c_orig, c_opt, positions)
        spy.rollouts.append(out)
        return out

    def spied_denoise(model, *args, **kwargs):
        x0 = denoise(model, *args, **kwargs)
        spy.samples.append(
            {
                "active": tuple(model.transformer.active_adapters()),
                "args": args,
                "theta": adapter_state(model.transformer, POLICY),
                "theta_old": adapter_state(model.transformer, OLD),
                "x0": x0.clone(),
            }
        )
        return x0

    def spied_update(learner, batch, *args, **kwargs):
        spy.batches.append(batch)
        return real_update(learner, batch, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "perturb", perturb)
    monkeypatch.setattr(loop.Trainer, "rollout", spied_rollout)
    monkeypatch.setattr(loop, "denoise", spied_denoise)
    monkeypatch.setattr(loop, "nft_update", spied_update)
    cfg = tiny_config(tmp_path, K=K, G=G, iterations=2)
    for name, value in rollout.items():
        setattr(cfg.rollout, name, value)
    trainer = asyncio.run(run_training(cfg, tmp_path / "run"))
    assert len(spy.batches) == 2
    return trainer, spy


def expected_conditions(trainer: loop.Trainer, spy: Spy, it: int) -> tuple[Conditioning, Conditioning]:
    """Per sample of iteration ``it``: C_orig of its prompt, and the condition that generated it."""
    plan = spy.rollouts[it].plan
    c_orig = trainer.model.text.encode(spy.prompts[it])[plan.prompt_index]
    num_m = len(spy.c_opt[it]) // len(spy.prompts[it])
    rows = plan.prompt_index * num_m + plan.variant_index.clamp(min=0)
    opt = spy.c_opt[it][rows]
    perturbed = plan.variant_index >= 0
    generating = Conditioning(
        torch.where(perturbed.view(-1, 1, 1), opt.prompt_embeds, c_orig.prompt_embeds),
        torch.where(perturbed.view(-1, 1), opt.pooled, c_orig.pooled),
    )
    return c_orig, generating


def test_update_conditions_on_c_orig_and_rollouts_use_the_old_policy(tmp_path, monkeypatch) -> None:
    trainer, spy = spied_run(tmp_path, monkeypatch)
    for it, batch in enumerate(spy.batches):
        c_orig, generating = expected_conditions(trainer, spy, it)
        perturbed = spy.rollouts[it].plan.variant_index >= 0
        assert perturbed.sum() == 2 * G * (K - 1)
        assert not torch.equal(generating.prompt_embeds[perturbed], c_orig.prompt_embeds[perturbed])
        assert torch.equal(batch.condition.prompt_embeds, c_orig.prompt_embeds)
        assert torch.equal(batch.condition.pooled, c_orig.pooled)

    assert {s["active"] for s in spy.samples} == {(OLD,)}
    first = spy.samples[0]
    assert not all(torch.equal(first["theta"][k], first["theta_old"][k]) for k in first["theta"])
    model = trainer.model
    for state, same in ((first["theta_old"], True), (first["theta"], False)):
        load_adapter_state(model.transformer, OLD, state)
        use_adapter(model.transformer, OLD)
        again = denoise(model, *first["args"])
        use_adapter(model.transformer, POLICY)
        assert torch.equal(again, first["x0"]) == same


def test_generating_condition_ablation_trains_on_the_sampling_condition(tmp_path, monkeypatch) -> None:
    trainer, spy = spied_run(tmp_path, monkeypatch, train_condition="generating")
    for it, batch in enumerate(spy.batches):
        _, generating = expected_conditions(trainer, spy, it)
        assert torch.equal(batch.condition.prompt_embeds, generating.prompt_embeds)
        assert torch.equal(batch.condition.pooled, generating.pooled)


def test_advantages_group_all_g_k_samples_of_a_prompt(tmp_path, monkeypatch) -> None:
    """r from REFERENCE §2 computed here with numpy from the rewards the rollout returned."""
    _, spy = spied_run(tmp_path, monkeypatch)
    for it, batch in enumerate(spy.batches):
        rollout = spy.rollouts[it]
        rewards = rollout.rewards.astype(np.float64)
        keys = np.array([spy.prompts[it][int(p)] for p in rollout.plan.prompt_index])
        advantage = np.empty_like(rewards)
        for key in np.unique(keys):
            members = keys == key
            assert members.sum() == G * K
            advantage[members] = rewards[members] - rewards[members].mean()
        advantage /= np.std(rewards) + 1e-4
        r = np.clip(np.clip(advantage, -5, 5) / 10 + 0.5, 0, 1)
        assert np.ptp(r) > 0.01, "rewards should differ within a group"
        np.testing.assert_allclose(batch.r.numpy(), r, rtol=0, atol=1e-6)


def test_nft_update_is_the_hand_computed_loss_and_one_sgd_step() -> None:
    """Two micro-batches, 3 of 4 timesteps per sample, SGD without clipping: θ' = θ − lr·∇L with
    L = (1/(2·3)) Σ_micro Σ_j mean_batch c·[r·L⁺ + (1 − r)·L⁻]/β + kl·mean((v_θ − v_ref)²)."""
    model = tiny_model()
    transformer = model.transformer
    with torch.no_grad():  # θ, θ_old and the base all differ
        for name, p in adapter_named_params(transformer, POLICY).items():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
        for p in adapter_named_params(transformer, OLD).values():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    use_adapter(transformer, POLICY)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    lr, n = 0.05, 6
    optimizer = torch.optim.SGD(adapter_named_params(transformer, POLICY).values(), lr=lr)
    data = torch.Generator().manual_seed(1)
    cond = model.text.encode(["a red circle", "two blue squares"] * 3)
    sigmas = inference_sigmas(model, 4)
    batch = TrainBatch(
        x0=torch.randn(n, *model.sample_shape, generator=data),
        condition=cond,
        r=torch.rand(n, generator=data),
        sigmas=sigmas,
        generators=[torch.Generator().manual_seed(100 + i) for i in range(n)],
        order=torch.Generator().manual_seed(7),
    )
    nft = NFTConfig(nft_beta=0.7, kl_weight=0.3, adv_clip=5.0, train_timestep_fraction=0.8)
    optim = OptimConfig(lr=lr, grad_clip=0.0, train_batch_size=3)

    # By hand: the order generator shuffles the samples; each sample's generator draws its timesteps,
    # then its noise at each of them in turn.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    own = [torch.Generator().manual_seed(100 + i) for i in range(n)]
    t_all = train_sigmas(sigmas, nft.train_timestep_fraction, own)
    assert t_all.shape == (n, 3)
    theta = dict(adapter_named_params(transformer, POLICY))
    before = adapter_state(transformer, POLICY)
    total = torch.zeros(())
    beta = nft.nft_beta

    def v(adapter: str | None, x, t, c):
        if adapter is None:
            transformer.disable_adapters()
        else:
            use_adapter(transformer, adapter)
        out = model.velocity(x, t, c.prompt_embeds, c.pooled)
        transformer.enable_adapters()
        use_adapter(transformer, POLICY)
        return out

    for idx in order.split(3):
        x0, c, r = batch.x0[idx], batch.condition[idx], batch.r[idx]
        for j in range(3):
            t = t_all[idx, j]
            eps = torch.stack([torch.randn(x0.shape[1:], generator=own[int(i)]) for i in idx])
            x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
            with torch.no_grad():
                v_old, v_ref = v(OLD, x_t, t, c), v(None, x_t, t, c)
            v_theta = v(POLICY, x_t, t, c)
            losses = []
            for v_pm in (beta * v_theta + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_theta):
                err = (x_t - t.view(-1, 1, 1, 1) * v_pm) - x0
                weight = err.detach().abs().flatten(1).mean(1).clamp_min(1e-5)
                losses.append(err.pow(2).flatten(1).mean(1) / weight)
            policy = (nft.adv_clip * (r * losses[0] + (1 - r) * losses[1]) / beta).mean()
            kl = (v_theta - v_ref).pow(2).flatten(1).mean(1).mean()
            total = total + (policy + nft.kl_weight * kl) / 6
    grads = torch.autograd.grad(total, list(theta.values()))
    expected = {k: (p - lr * g).detach() for (k, p), g in zip(theta.items(), grads, strict=True)}

    means, steps = nft_update(Learner(model, transformer, optimizer, accelerator), batch, nft, optim)
    assert steps == 1
    after = adapter_state(transformer, POLICY)
    for key, value in expected.items():
        torch.testing.assert_close(after[key], value, rtol=1e-5, atol=1e-7)
    assert max((after[k] - before[k]).abs().max() for k in before) > 1e-4  # the step is not negligible
    torch.testing.assert_close(torch.tensor(means["loss"]), total.detach(), rtol=1e-5, atol=0)
