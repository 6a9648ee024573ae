"""shapes.sensitivity: the encoder swap touches exactly one encoder's features, and the measurement runs."""

from __future__ import annotations

import torch

from shapes import sensitivity
from shapes.evaluate import DEFAULT_MODEL
from trainer.config import build_config
from trainer.model import load_model


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
