"""trainer.sensitivity: the encoder swap touches exactly one encoder's features, the binding shares are
those of the returned δ, the σ-grid shift reaches both loaders, and the measurement runs."""

from __future__ import annotations

import pytest
import torch

from shapes.heldout import DEFAULT_MODEL
from shapes.model import load_shapes_model
from trainer import sensitivity
from trainer.config import build_config
from trainer.model import load_model
from trainer.perturb import PerturbConfig, perturb_prompts, sample_initial_deltas
from trainer.rollout import inference_sigmas


def test_swap_replaces_exactly_one_encoders_features() -> None:
    model = load_model(build_config("shapes").model, "cpu")
    text = model.text
    prompts, donors = (
        ["a photo of a red circle", "two blue squares"],
        ["three green triangles", "a pink square"],
    )
    cond, donor = text.encode(prompts), text.encode(donors)
    ids_l = text.clip_l_ids(donors)
    ids_g = text._clip_ids(text.tokenizer_2, donors)
    with torch.no_grad():
        out_l = text.text_encoder(ids_l, output_hidden_states=True)
        out_g = text.text_encoder_2(ids_g, output_hidden_states=True)
    width_l = out_l.hidden_states[-2].shape[-1]
    swapped_l = sensitivity.swap_encoder(cond, donor, model, "l")
    torch.testing.assert_close(
        swapped_l.prompt_embeds[..., :width_l], out_l.hidden_states[-2], rtol=0, atol=1e-6
    )
    torch.testing.assert_close(swapped_l.prompt_embeds[..., width_l:], cond.prompt_embeds[..., width_l:])
    proj_l = out_l.text_embeds.shape[-1]
    torch.testing.assert_close(swapped_l.pooled[:, :proj_l], out_l.text_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(swapped_l.pooled[:, proj_l:], cond.pooled[:, proj_l:])

    swapped_g = sensitivity.swap_encoder(cond, donor, model, "g")
    width_g = out_g.hidden_states[-2].shape[-1]
    torch.testing.assert_close(
        swapped_g.prompt_embeds[..., width_l : width_l + width_g], out_g.hidden_states[-2], rtol=0, atol=1e-6
    )
    torch.testing.assert_close(swapped_g.prompt_embeds[..., :width_l], cond.prompt_embeds[..., :width_l])
    torch.testing.assert_close(swapped_g.pooled[:, proj_l:], out_g.text_embeds, rtol=0, atol=1e-6)
    assert swapped_g.prompt_embeds[..., width_l + width_g :].abs().max() == 0  # the zero padding stays zero


def test_measurement_runs_and_reports_shares_and_distances() -> None:
    result = sensitivity.measure(DEFAULT_MODEL, num_prompts=3, seed=0)
    for which in ("swap_clip_l", "swap_clip_g"):
        assert 0 <= result[which]["reward_changed"] <= 1 and result[which]["pixel_rms"] > 0
    p = result["perturbation"]
    assert p["variants_per_prompt"] == 3 and 0 <= p["ties_across_k"] <= 1
    assert p["pixel_rms_to_anchor_same_noise"] > 0 and 0 < p["pixel_rms_between_noises"] <= 1
    assert "swap CLIP-L" in sensitivity.table(result)


def shifted_grid(num_steps: int, shift: float) -> torch.Tensor:
    """SD3's shift σ' = s·σ / (1 + (s − 1)·σ) of a uniform grid, then the final 0.

    As diffusers' FlowMatchEulerDiscreteScheduler builds it: the uniform grid runs from 1 to the
    smallest of its 1000 training σ, which is itself already shifted.
    """

    def shifted(sigma: torch.Tensor) -> torch.Tensor:
        return shift * sigma / (1 + (shift - 1) * sigma)

    sigma_min = shifted(torch.tensor(1 / 1000, dtype=torch.float64))
    sigma = torch.linspace(1.0, float(sigma_min), num_steps, dtype=torch.float64)
    return torch.cat([shifted(sigma), torch.zeros(1, dtype=torch.float64)])


def test_scheduler_shift_replaces_the_priors_grid_in_both_loaders() -> None:
    trainer_model = load_model(build_config("shapes", overrides=["model.scheduler_shift=3.0"]).model, "cpu")
    torch.testing.assert_close(inference_sigmas(trainer_model, 10).double(), shifted_grid(10, 3.0))
    own = load_model(build_config("shapes").model, "cpu")
    torch.testing.assert_close(inference_sigmas(own, 10).double(), shifted_grid(10, 1.0))
    shapes_model = load_shapes_model(DEFAULT_MODEL, shift=3.0)
    shapes_model.scheduler.set_timesteps(10)
    torch.testing.assert_close(shapes_model.scheduler.sigmas.double(), shifted_grid(10, 3.0))


def test_binding_shares_are_those_of_the_returned_perturbation() -> None:
    model = load_model(build_config("shapes").model, "cpu")
    prompts = ["a photo of a red circle", "two blue squares"]
    config = PerturbConfig(num_steps=20, max_norm_mode="relative", max_norm=0.125, lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    result, _ = perturb_prompts(
        model.text,
        prompts,
        3,
        config,
        lambda mask, dim: sample_initial_deltas(mask, 3, dim, config.init_std, generator),
    )
    found = sensitivity.binding(result, config)
    # Independently: each prompt's bound from its own CLIP-L token embeddings at the content positions.
    with torch.no_grad():
        embeds = model.text.text_encoder.get_input_embeddings()(model.text.clip_l_ids(prompts))
    norms = [embeds[p][result.mask[p]].norm(dim=-1) for p in range(len(prompts))]
    bounds = torch.stack([0.125 * n.mean() for n in norms])
    deltas = [result.deltas[p][:, result.mask[p]].norm(dim=-1) for p in range(len(prompts))]
    at_bound = torch.cat([(d >= 0.99 * b).flatten() for d, b in zip(deltas, bounds, strict=True)])
    assert found["token_norm_mean"] == pytest.approx(float(torch.cat(norms).mean()), rel=1e-5)
    assert found["bound_mean"] == pytest.approx(float(bounds.mean()), rel=1e-5)
    assert found["tokens_at_bound"] == pytest.approx(float(at_bound.float().mean()))
    in_band = ((result.cos_to_anchor - 0.8).abs() <= 0.01).float().mean()
    assert found["variants_in_anchor_band"] == pytest.approx(float(in_band))
    assert found["cos_to_anchor_min"] <= found["cos_to_anchor_max"] < 1
