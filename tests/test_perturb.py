"""The embedding-perturbed mechanism against hand computations, on a tiny seeded CLIP text encoder."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from services.clip_shared.tokenizer import clip_tokenizer
from trainer.perturb import (
    PerturbConfig,
    anchor_loss,
    content_mask,
    diversity_loss,
    embedding_objective,
    mean_token_norm,
    optimize_perturbations,
    project_max_norm_,
    resolve_max_norm,
    sample_initial_deltas,
)

BOS, EOS = 49406, 49407
PROMPTS = ["a photo of a red circle", "two blue squares left of a green triangle", "a yellow cross"]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def encoder() -> CLIPTextModelWithProjection:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=16,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    return CLIPTextModelWithProjection(config).eval().requires_grad_(False)


def tokenize(tokenizer, prompts: list[str], max_length: int = 77) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


def make_embed_fn(model: CLIPTextModelWithProjection, input_ids: torch.Tensor):
    """What the trainer does: replace the token-lookup output with given embeddings via a forward hook."""
    lookup = model.text_model.embeddings.token_embedding

    def embed_fn(token_embeds: torch.Tensor) -> torch.Tensor:
        rows_per_prompt = token_embeds.shape[0] // input_ids.shape[0]
        handle = lookup.register_forward_hook(lambda module, args, output: token_embeds)
        try:
            return model(input_ids=input_ids.repeat_interleave(rows_per_prompt, dim=0)).text_embeds
        finally:
            handle.remove()

    return embed_fn


def setup(model, tokenizer, prompts, max_length: int = 77):
    """Token ids, E, the content mask and embed_fn. The text encoder is causal and pools at the first EOS,
    so a shorter max_length changes nothing but the cost of the padding positions."""
    ids = tokenize(tokenizer, prompts, max_length)
    with torch.no_grad():
        embeds = model.text_model.embeddings.token_embedding(ids)
    mask = content_mask(ids, bos_id=BOS, eos_id=EOS, pad_id=None)
    return ids, embeds, mask, make_embed_fn(model, ids)


def test_hooked_embed_fn_reproduces_text_embeds(encoder, tokenizer) -> None:
    ids, embeds, _, embed_fn = setup(encoder, tokenizer, [*PROMPTS, ""])
    with torch.no_grad():
        expected = encoder(input_ids=ids).text_embeds
        got = embed_fn(embeds)
        # rows repeated per prompt (the variants' layout) pool at each prompt's own EOS
        repeated = embed_fn(embeds.repeat_interleave(3, dim=0))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(repeated, expected.repeat_interleave(3, dim=0), rtol=1e-6, atol=1e-6)
    # causal attention + pooling at the first EOS: padding beyond it does not matter
    _, short_embeds, _, short_fn = setup(encoder, tokenizer, PROMPTS, max_length=16)
    with torch.no_grad():
        torch.testing.assert_close(short_fn(short_embeds), expected[:3], rtol=1e-5, atol=1e-6)
    # the hook is gone afterwards
    with torch.no_grad():
        torch.testing.assert_close(encoder(input_ids=ids).text_embeds, expected, rtol=0, atol=0)


# ---------------------------------------------------------------- content mask


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_content_mask_excludes_boundaries_and_padding(pad_token: str) -> None:
    tok = clip_tokenizer(pad_token=pad_token)
    long_prompt = " ".join(["red"] * 100)
    prompts = ["", "a red circle", "two blue squares left of a green triangle", long_prompt]
    ids = tokenize(tok, prompts)
    mask = content_mask(ids, bos_id=BOS, eos_id=EOS, pad_id=None)
    assert ids[3, -1].item() == EOS  # truncated to 77 with EOS at the last position
    for row, prompt in enumerate(prompts):
        num_tokens = min(len(tok(prompt, add_special_tokens=False).input_ids), 75)
        expected = torch.zeros(77, dtype=torch.bool)
        expected[1 : 1 + num_tokens] = True
        assert torch.equal(mask[row], expected), prompt
    assert mask[0].sum() == 0 and mask[3].sum() == 75


def test_content_mask_hand_ids() -> None:
    ids = torch.tensor(
        [
            [BOS, 10, 11, EOS, 0, 0],  # "!"-padded
            [BOS, 10, EOS, EOS, EOS, EOS],  # EOS-padded: only the first EOS ends the content
            [BOS, 0, 12, 13, 14, 15],  # no EOS; a pad id inside is excluded when pad_id is given
            [BOS, EOS, 5, 5, 5, 5],  # empty prompt, garbage after EOS
        ]
    )
    got = content_mask(ids, bos_id=BOS, eos_id=EOS, pad_id=0)
    expected = torch.tensor(
        [
            [0, 1, 1, 0, 0, 0],
            [0, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(got, expected)
    assert content_mask(ids, bos_id=BOS, eos_id=EOS, pad_id=None)[2, 1].item()


# ---------------------------------------------------------------- losses


def unit2(degrees: float, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.tensor([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])


def test_diversity_loss_hand_values() -> None:
    identical = torch.stack([unit2(30), unit2(30, 5.0), unit2(30, 0.1)])  # cos 1 whatever the length
    # pairwise cosines (0°,90°) = 0, (0°,180°) = −1, (90°,180°) = 0 → mean over ordered pairs −1/3
    right_angles = torch.stack([unit2(0), unit2(90, 3.0), unit2(180, 2.0)])
    # pairwise cosines 0.5, −0.5, 0.5 → 1/6
    sixty = torch.stack([unit2(0), unit2(60, 2.0), unit2(120)])
    e = torch.stack([identical, right_angles, sixty])
    torch.testing.assert_close(diversity_loss(e), torch.tensor([1.0, -1 / 3, 1 / 6]))
    orthogonal = torch.eye(3)
    torch.testing.assert_close(diversity_loss(orthogonal[None]), torch.tensor([0.0]))
    assert torch.equal(diversity_loss(torch.randn(4, 1, 8)), torch.zeros(4))
    assert torch.equal(diversity_loss(torch.randn(4, 0, 8)), torch.zeros(4))
    assert diversity_loss(torch.randn(2, 3, 8, dtype=torch.float16)).dtype == torch.float32


def test_anchor_loss_hand_values_and_insensitive_zone() -> None:
    mu, eps = 0.8, 0.01
    anchor = torch.tensor([[2.0, 0.0]])

    def at_cos(c: float, scale: float = 1.0) -> torch.Tensor:
        return torch.tensor([c, math.sqrt(1 - c * c)]) * scale

    inside = torch.stack([at_cos(0.8), at_cos(0.805, 3.0), at_cos(0.795), at_cos(0.81 - 1e-6)])
    assert anchor_loss(inside[None], anchor, mu, eps).item() == pytest.approx(0.0, abs=1e-6)
    outside = torch.stack([at_cos(1.0), at_cos(0.9, 0.5), at_cos(0.5), at_cos(-0.2)])
    # |1 − .8| − .01 = .19; .09; .29; .99
    expected = 0.19 + 0.09 + 0.29 + 0.99
    assert anchor_loss(outside[None], anchor, mu, eps).item() == pytest.approx(expected, abs=1e-6)
    both = torch.stack([inside, outside])
    torch.testing.assert_close(
        anchor_loss(both, anchor.expand(2, 2), mu, eps), torch.tensor([0.0, expected]), atol=1e-6, rtol=0
    )


def test_gradient_matches_finite_differences(encoder, tokenizer) -> None:
    model = copy.deepcopy(encoder).double()
    _, embeds, mask, embed_fn = setup(model, tokenizer, PROMPTS[:2])
    config = PerturbConfig(lambda_div=50.0, anchor_mu=0.8, anchor_eps=0.01)
    deltas = sample_initial_deltas(
        mask, 3, embeds.shape[-1], 0.05, torch.Generator().manual_seed(1), dtype=torch.float64
    )
    with torch.no_grad():
        e_anchor = embed_fn(embeds)

    def objective(d: torch.Tensor) -> torch.Tensor:
        return embedding_objective(embed_fn, embeds, mask, d, e_anchor, config)[0].sum()

    deltas.requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(deltas), deltas)
    step = 1e-6
    coords = [(0, 1, 2, 3), (1, 0, 1, 0), (1, 2, 5, 31), (0, 0, 40, 7)]  # the last is padding
    assert not mask[0, 40]
    for coord in coords:
        bump = torch.zeros_like(deltas)
        bump[coord] = step
        with torch.no_grad():
            estimate = (objective(deltas + bump) - objective(deltas - bump)) / (2 * step)
        assert grad[coord].item() == pytest.approx(estimate.item(), rel=1e-5, abs=1e-8), coord
    assert grad[0, 0, 40].abs().max().item() == 0.0  # padding gets no gradient at all
    assert grad[0, :, 2].abs().sum() > 0


# ---------------------------------------------------------------- projection


def test_per_token_projection_bounds_and_leaves_small_tokens_bitwise() -> None:
    generator = torch.Generator().manual_seed(0)
    delta = (
        torch.randn(2, 3, 6, 4, generator=generator)
        * torch.tensor([0.01, 0.1, 1.0, 0.02, 0.5, 0.03])[:, None]
    )
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    bound = torch.tensor([0.05, 0.2])
    before = delta.clone()
    project_max_norm_(delta, mask, bound, "per_token")
    norms, norms_before = delta.norm(dim=-1), before.norm(dim=-1)
    content = mask[:, None, :].expand_as(norms)
    assert (norms <= bound[:, None, None] * (1 + 1e-6)).all()
    small = content & (norms_before <= bound[:, None, None])
    assert small.any() and (~small & content).any()
    assert torch.equal(delta[small], before[small])
    clipped = content & ~small
    torch.testing.assert_close(norms[clipped], bound[:, None, None].expand_as(norms)[clipped])
    # direction is kept
    torch.testing.assert_close(
        delta[clipped] / norms[clipped][:, None], before[clipped] / norms_before[clipped][:, None]
    )
    assert torch.equal(delta[~content], torch.zeros_like(delta[~content]))


def test_global_projection_bounds_frobenius_norm() -> None:
    delta = torch.randn(2, 2, 5, 3, generator=torch.Generator().manual_seed(3))
    delta[1, 1] *= 1e-3  # this variant is inside the ball
    mask = torch.tensor([[0, 1, 1, 1, 0]] * 2, dtype=torch.bool)
    before = delta.clone() * mask[:, None, :, None]
    project_max_norm_(delta, mask, 0.5, "global")
    frob = delta.flatten(2).norm(dim=-1)
    torch.testing.assert_close(frob[0], torch.full((2,), 0.5))
    assert frob[1, 0].item() == pytest.approx(0.5)
    assert torch.equal(delta[1, 1], before[1, 1])


def test_no_token_exceeds_max_norm_after_optimisation(encoder, tokenizer) -> None:
    _, embeds, mask, embed_fn = setup(encoder, tokenizer, PROMPTS[:2], max_length=16)
    config = PerturbConfig(num_steps=5, lr=0.05, max_norm=0.02)  # steps far larger than the bound
    result = optimize_perturbations(embed_fn, embeds, mask, 3, config, torch.Generator().manual_seed(0))
    norms = result.deltas.norm(dim=-1)
    content = mask[:, None, :].expand_as(norms)
    assert norms[content].max().item() <= 0.02 * (1 + 1e-6)
    assert norms[content].min().item() == pytest.approx(0.02, rel=1e-4)  # every token hit the bound
    assert torch.equal(result.deltas[~content], torch.zeros_like(result.deltas[~content]))
    assert torch.equal(
        result.perturbed_embeds[~content], embeds[:, None].expand_as(result.perturbed_embeds)[~content]
    )
    assert result.stats()["perturb/delta_norm_max"] <= 0.02 * (1 + 1e-6)
    assert result.stats()["perturb/bound_mean"] == pytest.approx(0.02)
    assert result.stats()["perturb/tokens_at_bound"] == 1.0  # the norm ball binds every token


def test_relative_max_norm_scales_with_embedding_norm(encoder, tokenizer) -> None:
    _, embeds, mask, embed_fn = setup(encoder, tokenizer, [*PROMPTS[:2], ""], max_length=16)
    config = PerturbConfig(max_norm=0.5, max_norm_mode="relative")
    token_norm = mean_token_norm(embeds, mask)
    bound = resolve_max_norm(token_norm, config)
    for row in range(2):
        hand = embeds[row][mask[row]].norm(dim=-1).mean()
        assert token_norm[row].item() == pytest.approx(hand.item(), rel=1e-6)
        assert bound[row].item() == pytest.approx(0.5 * hand.item(), rel=1e-6)
    assert bound[2].item() == 0.0  # empty prompt
    torch.testing.assert_close(resolve_max_norm(mean_token_norm(10 * embeds, mask), config), 10 * bound)
    absolute = resolve_max_norm(token_norm, PerturbConfig(max_norm=0.5))
    assert torch.equal(absolute, torch.full((3,), 0.5))

    result = optimize_perturbations(
        embed_fn,
        embeds,
        mask,
        2,
        PerturbConfig(num_steps=5, lr=0.05, max_norm=0.1, max_norm_mode="relative"),
        torch.Generator().manual_seed(0),
    )
    token_bound = 0.1 * token_norm
    torch.testing.assert_close(result.bound, token_bound)  # the result says which bound it was held to
    torch.testing.assert_close(result.token_norm, token_norm)
    assert (result.delta_norm <= token_bound[:, None, None] * (1 + 1e-6)).all()
    assert result.delta_norm[0].max().item() == pytest.approx(token_bound[0].item(), rel=1e-4)


# ---------------------------------------------------------------- optimisation


def test_batched_equals_per_prompt(encoder, tokenizer) -> None:
    ids, embeds, mask, _ = setup(encoder, tokenizer, PROMPTS[:2], max_length=16)
    config = PerturbConfig(num_steps=60, lr=1e-2, max_norm=0.1)
    init = sample_initial_deltas(mask, 3, embeds.shape[-1], 1e-2, torch.Generator().manual_seed(5))
    together = optimize_perturbations(
        make_embed_fn(encoder, ids), embeds, mask, 3, config, None, init_deltas=init
    ).deltas
    for row in range(2):
        alone = optimize_perturbations(
            make_embed_fn(encoder, ids[row : row + 1]),
            embeds[row : row + 1],
            mask[row : row + 1],
            3,
            config,
            None,
            init_deltas=init[row : row + 1],
        ).deltas
        torch.testing.assert_close(together[row : row + 1], alone, rtol=0, atol=1e-6)
        assert alone.abs().max() > 1e-2  # it moved


def test_optimisation_moves_to_anchor_band_and_diversity_spreads(encoder, tokenizer) -> None:
    _, embeds, mask, embed_fn = setup(encoder, tokenizer, PROMPTS[:2], max_length=16)
    with torch.no_grad():
        e_anchor = embed_fn(embeds)
    # tiny random encoders need a bound relative to their own embedding scale to reach cos 0.8
    base = PerturbConfig(max_norm=1.0, max_norm_mode="relative")
    init = sample_initial_deltas(mask, 3, embeds.shape[-1], base.init_std, torch.Generator().manual_seed(0))
    _, _, _, cos_init = embedding_objective(embed_fn, embeds, mask, init, e_anchor, base)
    assert cos_init.min().item() > 0.999

    plain = optimize_perturbations(
        embed_fn,
        embeds,
        mask,
        3,
        PerturbConfig(lambda_div=0.0, max_norm=1.0, max_norm_mode="relative"),
        None,
        init_deltas=init,
    )
    diverse = optimize_perturbations(
        embed_fn,
        embeds,
        mask,
        3,
        PerturbConfig(lambda_div=1.0, max_norm=1.0, max_norm_mode="relative"),
        None,
        init_deltas=init,
    )
    for result in (plain, diverse):
        assert 0.7 <= result.cos_to_anchor.mean().item() <= 0.9
        assert result.loss_history.shape == (300,)
        assert result.loss_history[-1] < result.loss_history[0]
    assert diverse.loss_div.mean() < plain.loss_div.mean() - 0.1
    stats = diverse.stats()
    assert stats["perturb/pairwise_cos_mean"] == pytest.approx(diverse.loss_div.mean().item())
    assert stats["perturb/cos_anchor_mean"] == pytest.approx(diverse.cos_to_anchor.mean().item())


def test_same_seed_same_deltas(encoder, tokenizer) -> None:
    _, embeds, mask, embed_fn = setup(encoder, tokenizer, PROMPTS[:2], max_length=16)
    config = PerturbConfig(num_steps=10)

    def run(seed: int) -> torch.Tensor:
        return optimize_perturbations(
            embed_fn, embeds, mask, 2, config, torch.Generator().manual_seed(seed)
        ).deltas

    first = run(7)
    assert torch.equal(first, run(7))
    assert not torch.equal(first, run(8))


def test_empty_prompt_keeps_zero_delta(encoder, tokenizer) -> None:
    _, embeds, mask, embed_fn = setup(encoder, tokenizer, ["", PROMPTS[0]], max_length=16)
    config = PerturbConfig(num_steps=20, lr=1e-2)
    result = optimize_perturbations(embed_fn, embeds, mask, 3, config, torch.Generator().manual_seed(0))
    assert torch.equal(result.deltas[0], torch.zeros_like(result.deltas[0]))
    torch.testing.assert_close(result.cos_to_anchor[0], torch.ones(3))
    assert result.deltas[1].abs().max() > 0


def test_single_condition_computes_nothing(tokenizer) -> None:
    calls = []

    def embed_fn(token_embeds: torch.Tensor) -> torch.Tensor:
        calls.append(token_embeds.shape)
        raise AssertionError("the encoder must not run when K = 1")

    ids = tokenize(tokenizer, PROMPTS)
    embeds = torch.randn(3, 77, 32)
    mask = content_mask(ids, bos_id=BOS, eos_id=EOS, pad_id=None)
    result = optimize_perturbations(embed_fn, embeds, mask, 0, PerturbConfig(), torch.Generator())
    assert not calls
    assert result.deltas.shape == (3, 0, 77, 32) and result.perturbed_embeds.shape == (3, 0, 77, 32)
    assert result.stats() == {}


def test_runs_inside_inference_mode_with_half_precision_encoder(encoder, tokenizer) -> None:
    model = copy.deepcopy(encoder).to(torch.bfloat16)
    _, embeds, mask, embed_fn = setup(model, tokenizer, PROMPTS[:2], max_length=16)
    assert embeds.dtype == torch.bfloat16
    with torch.inference_mode():
        result = optimize_perturbations(
            embed_fn, embeds, mask, 2, PerturbConfig(num_steps=5, lr=1e-2), torch.Generator().manual_seed(0)
        )
    assert result.deltas.dtype == torch.float32 and result.perturbed_embeds.dtype == torch.bfloat16
    assert torch.isfinite(result.loss_history).all() and result.deltas.abs().max() > 0


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="max_norm_mode"):
        PerturbConfig(max_norm_mode="percent")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_steps"):
        PerturbConfig(num_steps=-1)
    with pytest.raises(ValueError, match="mask"):
        optimize_perturbations(
            lambda x: x[:, 0],
            torch.zeros(2, 5, 4),
            torch.ones(2, 4, dtype=torch.bool),
            2,
            PerturbConfig(),
            None,
        )
