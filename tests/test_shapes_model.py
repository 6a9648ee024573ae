"""Shapes model: SD3 conditioning, pipeline layout, pretraining resume and the shipped weights."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from services.clip_shared.tokenizer import END_OF_TEXT_ID
from services.geneval.grid import GridLayout, tag_grid
from shapes import pretrain
from shapes.heldout import (
    EvalConfig,
    evaluate_model,
    expand_records,
    heldout_records,
    sample_euler,
)
from shapes.model import (
    MANIFEST,
    ShapesModel,
    ShapesModelConfig,
    build_tiny,
    from_uint8,
    load_shapes_model,
    read_manifest,
    save_shapes_model,
    to_uint8,
    weight_checksums,
)
from shapes.prompts import all_metadata
from shapes.render import render
from shapes.text import ClipTextConfig
from shapes.vocab import TAGS
from tests.tiny_sd3 import vae_less_pipeline
from trainer.sampler import sample as trainer_sample

SHIPPED = Path(__file__).resolve().parents[1] / "shapes" / "weights"
PROMPTS = [
    "a photo of a red circle",
    "a photo of four crosses",
    "A photo of a Blue square, below a triangle!",
    "a photo of a red circle and a green square and a blue cross and a white triangle",
    "",
]

# A few-thousand-parameter transformer (the text encoders keep CLIP's 49,408-row vocabulary) and a 16-token
# context, so a prompt of the list below is truncated.
CONTEXT = 16
SMALL = ShapesModelConfig(
    num_layers=2,
    num_attention_heads=1,
    attention_head_dim=16,
    dual_attention_layers=(0,),
    joint_attention_dim=24,
    clip_l=ClipTextConfig(
        hidden_size=8, num_heads=1, intermediate_size=16, projection_dim=8, max_length=CONTEXT
    ),
    clip_g=ClipTextConfig(
        hidden_size=8,
        num_heads=1,
        intermediate_size=16,
        projection_dim=8,
        hidden_act="gelu",
        max_length=CONTEXT,
    ),
)


@pytest.fixture(scope="module")
def small_model() -> ShapesModel:
    return build_tiny(SMALL, seed=0)


def sd3_pipeline(model: ShapesModel) -> StableDiffusion3Pipeline:
    return vae_less_pipeline(
        model.transformer,
        model.scheduler,
        model.text_encoder,
        model.tokenizer,
        model.text_encoder_2,
        model.tokenizer_2,
    )


# Conditioning -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t5_sequence_length", [0, 6])
def test_encode_prompt_equals_diffusers_sd3_pipeline(small_model, t5_sequence_length):
    small_model.t5_sequence_length = t5_sequence_length
    try:
        ours = small_model.encode_prompt(PROMPTS)
    finally:
        small_model.t5_sequence_length = 0
    embeds, _, pooled, _ = sd3_pipeline(small_model).encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=t5_sequence_length
    )
    assert ours[0].shape == (len(PROMPTS), CONTEXT + t5_sequence_length, SMALL.joint_attention_dim)
    assert ours[1].shape == (len(PROMPTS), 16)
    torch.testing.assert_close(ours[0], embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[1], pooled, atol=1e-6, rtol=0)
    # CLIP-L || CLIP-G fills the first 16 features; the zero padding and the T5 slots are exactly 0.
    assert ours[0][:, :CONTEXT, 16:].abs().max() == 0
    if t5_sequence_length:
        assert ours[0][:, CONTEXT:].abs().max() == 0


def test_pooling_reads_the_first_end_of_text_token(small_model):
    encoder = small_model.text_encoder
    assert encoder.config.eos_token_id == END_OF_TEXT_ID
    ids_l, ids_g = small_model.tokenize(["a photo of two red squares"])
    assert ids_g[0, -1] == 0, "CLIP-G role pads with '!' as SD3's second tokenizer"
    end = int((ids_l[0] == END_OF_TEXT_ID).nonzero()[0])
    out = encoder(ids_l, output_hidden_states=True)
    manual = encoder.text_projection(encoder.text_model.final_layer_norm(out.hidden_states[-1])[0, end])
    torch.testing.assert_close(out.text_embeds[0], manual)


def test_image_mapping_roundtrip():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    x0 = from_uint8(images)
    assert x0.min() >= -1 and x0.max() <= 1
    np.testing.assert_array_equal(to_uint8(x0), images)


# Pipeline layout --------------------------------------------------------------------------------------------


def test_save_load_roundtrip_in_sd3_layout(small_model, tmp_path):
    checksums = save_shapes_model(small_model, tmp_path, weights_dtype=torch.float32)
    for folder in ("transformer", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        assert (tmp_path / folder).is_dir(), folder
    assert sorted(checksums) == [
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
    ]
    loaded = load_shapes_model(tmp_path)
    for name, module in small_model.components().items():
        for (key, a), b in zip(
            module.state_dict().items(), loaded.components()[name].state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), f"{name}.{key}"
    for a, b in zip(small_model.encode_prompt(PROMPTS), loaded.encode_prompt(PROMPTS), strict=True):
        assert torch.equal(a, b)
    assert loaded.scheduler.config.shift == SMALL.shift
    # Plain diffusers opens the directory as an SD3 pipeline.
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path, vae=None, text_encoder_3=None, tokenizer_3=None)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    assert torch.equal(embeds[:, :CONTEXT], loaded.encode_prompt(PROMPTS)[0])
    assert torch.equal(pooled, loaded.encode_prompt(PROMPTS)[1])


def test_float16_storage_is_exact_on_reload(small_model, tmp_path):
    save_shapes_model(small_model, tmp_path)
    loaded = load_shapes_model(tmp_path)
    assert loaded.transformer.dtype == torch.float32
    for name, module in small_model.components().items():
        for a, b in zip(
            module.state_dict().values(), loaded.components()[name].state_dict().values(), strict=True
        ):
            assert torch.equal(a.half().float() if a.is_floating_point() else a, b)


def test_euler_sampler_matches_the_diffusers_pipeline(small_model):
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    embeds, pooled = small_model.encode_prompt(PROMPTS[:2])
    ours = sample_euler(small_model.transformer, small_model.scheduler, noise, embeds, pooled, num_steps=5)
    # Without a VAE the pipeline's latent is the image; its height/width assume a factor-8 VAE.
    theirs = sd3_pipeline(small_model)(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        latents=noise.clone(),
        height=256,
        width=256,
        num_inference_steps=5,
        guidance_scale=1.0,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_trainer_euler_rollout_takes_the_same_steps_bit_for_bit(small_model):
    """shapes.evaluate runs diffusers' scheduler loop; the trainer its own Euler sampler: equal exactly."""
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    embeds, pooled = small_model.encode_prompt(PROMPTS[:2])

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        timestep = torch.full((x.shape[0],), sigma) * 1000.0
        return small_model.transformer(
            hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=timestep
        ).sample.float()

    for shift in (1.0, 3.0):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(small_model.scheduler.config, shift=shift)
        with torch.no_grad():
            ours = sample_euler(small_model.transformer, scheduler, noise, embeds, pooled, num_steps=6)
            scheduler.set_timesteps(6)
            rollout = trainer_sample(velocity, noise, scheduler.sigmas.float(), method="euler")
        assert torch.equal(ours, rollout)


# Pretraining ------------------------------------------------------------------------------------------------


def small_pretrain_config(**overrides) -> pretrain.PretrainConfig:
    return pretrain.PretrainConfig(
        **{"steps": 4, "batch_size": 4, "warmup_steps": 1, "num_threads": 1, "model": SMALL, **overrides}
    )


def test_sigma_sampling_and_schedule():
    generator = torch.Generator().manual_seed(0)
    sigmas = pretrain.draw_training_sigmas(20_000, generator, t_sampling="logit_normal", shift=1.0)
    assert sigmas.min() > 0 and sigmas.max() < 1
    assert abs(sigmas.median().item() - 0.5) < 0.02  # logit-normal(0, 1) is symmetric around 0.5
    shifted = pretrain.draw_training_sigmas(20_000, generator, t_sampling="uniform", shift=3.0)
    assert abs(shifted.median().item() - 0.75) < 0.02  # the shift maps u = 0.5 to 3·0.5 / (1 + 2·0.5)
    config = pretrain.PretrainConfig(steps=100, warmup_steps=10, learning_rate=1.0)
    lrs = [pretrain.learning_rate(s, config) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:])) and lrs[-1] < 1e-3


def test_one_update_reduces_the_loss_on_a_fixed_batch():
    trainer = pretrain.Pretrainer(small_pretrain_config(learning_rate=3e-3))
    rng = np.random.default_rng(0)
    records = [all_metadata(tag)[0] for tag in TAGS]
    x0 = from_uint8(np.stack([render(r, rng) for r in records]))
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=generator)
    sigmas = pretrain.draw_training_sigmas(len(records), generator, t_sampling="logit_normal", shift=1.0)
    ids = trainer.model.tokenize([r["prompt"] for r in records])

    def loss() -> torch.Tensor:
        return pretrain.flow_matching_loss(trainer.model, x0, noise, sigmas, *trainer.model.encode_ids(*ids))

    before = loss()
    trainer.optimizer.zero_grad()
    before.backward()
    assert trainer.model.text_encoder.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0
    trainer.optimizer.step()
    with torch.no_grad():
        assert loss().item() < before.item()


def test_encoder_dropout_empties_each_encoders_caption_independently():
    """SD3's per-encoder dropout: each encoder loses its caption on its own, at the configured rate, and a
    run without it draws nothing extra (its noise stream is that of the first prior's run)."""
    trainer = pretrain.Pretrainer(small_pretrain_config(encoder_dropout=0.463))
    empty = len(trainer.prompts.records)
    picks = np.zeros(20_000, dtype=np.int64)
    rows_l, rows_g = trainer.caption_rows(picks)
    drop_l, drop_g = (rows_l == empty).double(), (rows_g == empty).double()
    assert abs(drop_l.mean().item() - 0.463) < 0.015 and abs(drop_g.mean().item() - 0.463) < 0.015
    assert abs((drop_l * drop_g).mean().item() - 0.463**2) < 0.015  # independent: both ≈ 0.214
    assert set(rows_l.unique().tolist()) == {0, empty}

    plain = pretrain.Pretrainer(small_pretrain_config(encoder_dropout=0.0))
    reference = torch.Generator().manual_seed(plain.noise_rng.initial_seed())
    rows_l, rows_g = plain.caption_rows(picks[:8])
    assert torch.equal(rows_l, rows_g) and (rows_l == 0).all()
    torch.rand(8, generator=reference)  # the caption-dropout draw, and nothing else
    assert torch.equal(plain.noise_rng.get_state(), reference.get_state())


def test_frozen_text_encoders_are_not_updated():
    trainer = pretrain.Pretrainer(small_pretrain_config(train_text_encoders=False))
    before = {k: v.clone() for k, v in trainer.model.text_encoder.state_dict().items()}
    trainer.step()
    for key, value in trainer.model.text_encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_exported_weights_are_the_warmed_up_ema_of_the_trained_ones():
    trainer = pretrain.Pretrainer(small_pretrain_config(ema_decay=0.6))
    name, param = next(iter(trainer.model.transformer.named_parameters()))
    expected = param.detach().clone()
    for step in range(3):
        trainer.step()
        decay = min(0.6, (1 + step) / (10 + step))  # 0.1, 0.18…, 0.25 during warm-up, capped at 0.6
        expected = decay * expected + (1 - decay) * param.detach()
    averaged = dict(trainer.averaged_model().transformer.named_parameters())[name]
    torch.testing.assert_close(averaged, expected)
    assert not torch.equal(averaged, param)  # the live model keeps its own weights


def test_captions_are_drawn_by_tag_with_weights_by_prompt_count():
    prompts = pretrain.Pretrainer(small_pretrain_config()).prompts
    counts = np.array([len(indices) for indices in prompts.by_tag], dtype=float)
    np.testing.assert_allclose(prompts.tag_probabilities(1.0), counts / counts.sum())
    np.testing.assert_allclose(prompts.tag_probabilities(0.0), np.full(len(counts), 1 / len(counts)))
    half = prompts.tag_probabilities(0.5)
    np.testing.assert_allclose(half, np.sqrt(counts) / np.sqrt(counts).sum())
    picks = prompts.draw(20_000, np.random.default_rng(0), tag_weight_exponent=0.5)
    tag_of = {i: t for t, indices in enumerate(prompts.by_tag) for i in indices}
    frequencies = np.bincount([tag_of[int(i)] for i in picks], minlength=len(counts)) / len(picks)
    np.testing.assert_allclose(frequencies, half, atol=0.015)


def test_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    config = small_pretrain_config(checkpoint_every_s=0.0)
    straight = pretrain.train(config, tmp_path / "straight", resume=False, command="straight", progress=False)

    real_step = pretrain.Pretrainer.step

    def interrupted_step(self):
        if self.num_steps_done == 2:
            raise KeyboardInterrupt
        return real_step(self)

    out = tmp_path / "resumed"
    monkeypatch.setattr(pretrain.Pretrainer, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(config, out, resume=False, command="first", progress=False)
    assert (out / pretrain.CHECKPOINT).exists() and not (out / MANIFEST).exists()
    with pytest.raises(ValueError, match="--resume"):
        pretrain.train(config, out, resume=False, command="again", progress=False)
    monkeypatch.setattr(pretrain.Pretrainer, "step", real_step)
    resumed = pretrain.train(config, out, resume=True, command="resumed", progress=False)

    assert resumed["sha256"] == straight["sha256"]
    assert resumed["loss_log"] == straight["loss_log"]
    assert resumed["command"] == "first"  # the command that started the run, not the resuming one
    assert not (out / pretrain.CHECKPOINT).exists()
    assert read_manifest(out)["sha256"] == weight_checksums(out)


def test_resume_refuses_another_configuration(tmp_path):
    trainer = pretrain.Pretrainer(small_pretrain_config())
    trainer.step()
    other = pretrain.Pretrainer(small_pretrain_config(seed=1))
    with pytest.raises(ValueError, match=r"another configuration.*differing: \['seed'\]"):
        other.load_state_dict(trainer.state_dict())
    # How the run uses the machine may change: more threads once the machine frees up.
    more_threads = pretrain.Pretrainer(small_pretrain_config(num_threads=3, checkpoint_every_s=5.0))
    more_threads.load_state_dict(trainer.state_dict())
    assert more_threads.num_steps_done == 1


def test_command_line_architecture_reaches_the_saved_transformer(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # main() would otherwise re-exec the interpreter
    out = tmp_path / "model"
    flags = ["--steps", "2", "--batch-size", "2", "--threads", "1", "--no-progress"]
    architecture = ["--num-layers", "2", "--num-heads", "1", "--patch-size", "8", "--object-size", "7", "11"]
    pretrain.main(["--out", str(out), *flags, *architecture])
    saved = json.loads((out / "transformer" / "config.json").read_text())
    assert (saved["num_layers"], saved["num_attention_heads"], saved["patch_size"]) == (2, 1, 8)
    assert saved["dual_attention_layers"] == [0]  # the first half of the blocks, as SD3.5-M
    manifest = read_manifest(out)
    assert "--num-heads 1" in manifest["command"] and "--object-size 7 11" in manifest["command"]
    # SceneConfig keeps object sides as fractions of the image side.
    assert manifest["pretrain"]["scene"]["object_size_frac"] == [7 / 32, 11 / 32]


# Evaluation and the shipped weights -------------------------------------------------------------------------


def test_evaluation_sizes_and_grid(small_model):
    records = heldout_records(0)
    expanded = expand_records(records, EvalConfig())
    counts = {tag: sum(r["tag"] == tag for r in expanded) for tag in TAGS}
    assert all(n >= 64 for n in counts.values()), counts
    few = [next(r for r in records if r["tag"] == tag) for tag in TAGS]
    config = EvalConfig(num_steps=2, images_per_prompt=1, min_images_per_tag=1)
    result, images, used, correct = evaluate_model(small_model, few, config)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert set(result.per_tag) == set(TAGS) and all(0 <= v <= 1 for v in result.per_tag.values())
    assert result.overall == pytest.approx(np.mean(list(result.per_tag.values())))
    grid = tag_grid(images, used, correct)
    assert grid.size[1] == len(TAGS) * GridLayout().row_height(32)  # one row per tag


@pytest.fixture(scope="module")
def shipped() -> tuple[ShapesModel, dict]:
    if not (SHIPPED / MANIFEST).exists():
        pytest.skip("no shipped weights")
    return load_shapes_model(SHIPPED), json.loads((SHIPPED / MANIFEST).read_text())


def test_shipped_weights_match_their_manifest(shipped):
    _, manifest = shipped
    assert weight_checksums(SHIPPED) == manifest["sha256"]
    total = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert total < 20 * 2**20
    assert ShapesModelConfig.from_dict(manifest["config"]) == ShapesModelConfig()


def test_shipped_prior_is_imperfect_but_in_range(shipped):
    _, manifest = shipped
    assert 0.2 <= manifest["prior_eval"]["overall"] <= 0.7


def test_shipped_directory_opens_as_a_diffusers_sd3_pipeline(shipped):
    """The lines docs/shapes.md gives users: one dtype throughout, and 32×32 samples equal to ours."""
    model, _ = shipped
    pipe = StableDiffusion3Pipeline.from_pretrained(
        SHIPPED, vae=None, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    assert {c.dtype for c in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)} == {torch.float32}
    embeds, _, pooled, _ = pipe.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=0
    )
    ours = model.encode_prompt(PROMPTS)
    torch.testing.assert_close(embeds, ours[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, ours[1], atol=1e-6, rtol=0)

    pipe.set_progress_bar_config(disable=True)
    x0 = pipe(
        PROMPTS[:2],
        num_inference_steps=4,
        guidance_scale=1.0,
        max_sequence_length=0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert x0.shape == (2, 3, 32, 32)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = sample_euler(model.transformer, model.scheduler, noise, *model.encode_prompt(PROMPTS[:2]), 4)
    torch.testing.assert_close(x0, expected, atol=1e-6, rtol=0)


def test_shipped_model_generates_and_scores(shipped):
    model, _ = shipped
    records = [next(r for r in heldout_records(0) if r["tag"] == tag) for tag in TAGS]
    result, images, _, _ = evaluate_model(
        model, records, EvalConfig(num_steps=10, images_per_prompt=1, min_images_per_tag=1)
    )
    assert images.shape == (6, 32, 32, 3)
    assert set(result.per_tag) == set(TAGS)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 1 minute on 2 idle cores; far more when the CPU is shared
def test_shipped_prior_score_reproduces(shipped):
    model, manifest = shipped
    recorded = manifest["prior_eval"]
    config = EvalConfig(**recorded["config"])
    result, *_ = evaluate_model(model, heldout_records(manifest["pretrain"]["split_seed"]), config)
    assert abs(result.overall - recorded["overall"]) <= 0.03
