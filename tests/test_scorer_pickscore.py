"""PickScore served through the spine equals PickScore computed step by step with PIL (REFERENCE.md §4)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip import CLIPImageProcessor, CLIPImageProcessorPil

from services.client import GrpcRewardClient
from services.clip_shared.resize import resize_bicubic
from services.clip_shared.transforms import center_crop_transform
from services.core.hashing import file_sha256
from services.core.scorer import ScoreBatch
from services.pickscore import PickScoreScorer
from services.pickscore.checkpoint import build_tiny
from services.registry import build_scorer
from tests.conftest import PREPROCESSING_SIZES, random_image, running_server

ROOT = Path(__file__).resolve().parents[1]
OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# preprocessor_config.json of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore's processor)
VIT_H_PROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": OPENAI_MEAN.tolist(),
    "image_std": OPENAI_STD.tolist(),
    "resample": 3,
    "size": 224,
}


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def pil_clip_pixels(image: np.ndarray) -> np.ndarray:
    """CLIP preprocessing written out with PIL: (H, W, 3) uint8 → (3, 224, 224) float32.

    Shortest side → 224 (long side int(224·long/short)), PIL bicubic; centre crop 224 with the offset
    rounded down; /255; OpenAI mean/std.
    """
    height, width = image.shape[:2]
    short, long = min(height, width), max(height, width)
    new_long = int(224 * long / short)
    new_w, new_h = (224, new_long) if width <= height else (new_long, 224)
    pil = Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - 224) // 2, (new_h - 224) // 2
    pil = pil.crop((left, top, left + 224, top + 224))
    pixels = np.asarray(pil, dtype=np.float32) / 255.0
    return ((pixels - OPENAI_MEAN) / OPENAI_STD).transpose(2, 0, 1)


def sample_images(seed: int) -> list[np.ndarray]:
    """Smooth pictures with detail, in sizes that upscale, downscale and crop both ways (never tall, where
    Pillow ≥ 13 may reorder its passes — see services/clip_shared/resize.py)."""
    rng = np.random.default_rng(seed)
    out = []
    for height, width in ((64, 96), (80, 80), (240, 320), (48, 64), (300, 300)):
        yy, xx = np.mgrid[0:height, 0:width]
        base = (
            128 + 90 * np.sin(xx / rng.uniform(2, 9))[..., None] * np.cos(yy / rng.uniform(2, 9))[..., None]
        )
        out.append(np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8))
    return out


def independent_pickscore(
    scorer: PickScoreScorer, images: list[np.ndarray], prompts: list[str]
) -> np.ndarray:
    """logit_scale.exp() · cos(image, text), each prompt encoded on its own (no batch padding)."""
    model, tokenizer = scorer.model, scorer.tokenizer
    pixels = torch.from_numpy(np.stack([pil_clip_pixels(image) for image in images]))
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=pixels).pooler_output
        text_features = torch.cat(
            [
                model.get_text_features(
                    **tokenizer([p], truncation=True, max_length=77, return_tensors="pt")
                ).pooler_output
                for p in prompts
            ]
        )
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return (model.logit_scale.exp() * (image_features * text_features).sum(-1)).double().numpy()


@pytest.fixture(scope="module")
def scorer() -> PickScoreScorer:
    scorer = build_scorer("pickscore", tiny=True)
    assert isinstance(scorer, PickScoreScorer)
    return scorer


def test_served_score_equals_an_independent_computation(scorer: PickScoreScorer) -> None:
    images = sample_images(0)
    long_prompt = "a very detailed painting of " + "a red fox and " * 40 + "the end"
    prompts = ["a photo of a cat", "a red bicycle", "a photo of a cat", long_prompt, ""]
    expected = independent_pickscore(scorer, images, prompts)

    async def main():
        async with running_server(scorer, name="pickscore") as server:
            async with GrpcRewardClient(f"127.0.0.1:{server.port}") as client:
                as_uint8 = await client.score(images, prompts)
                # float input in [0, 1] is quantised with round(x·255) before scoring
                noise = np.random.default_rng(1).uniform(-0.45, 0.45, (len(images),))
                floats = [
                    (image.astype(np.float32) + n) / 255.0 for image, n in zip(images, noise, strict=True)
                ]
                as_float = await client.score(floats, prompts)
                return as_uint8, as_float

    served, served_float = run(main())
    assert served.model.name == "pickscore" and served.model.checkpoint_sha256 == "tiny:0"
    assert np.ptp(expected) > 0.1, "the tiny model should tell these samples apart"
    np.testing.assert_allclose(served.values["pickscore/raw"], expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(served.values["pickscore"], expected / 26, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(served_float.values["pickscore/raw"], served.values["pickscore/raw"])


def test_long_prompts_are_truncated_to_77_tokens_with_end_of_text_kept(scorer: PickScoreScorer) -> None:
    words = "a cat on a red sofa " * 30
    tokens = scorer.tokenizer([words], truncation=True, max_length=77)["input_ids"][0]
    assert len(tokens) == 77 and tokens[-1] == 49407
    image = torch.from_numpy(sample_images(2)[0]).permute(2, 0, 1)
    batch = ScoreBatch(
        images=[image, image], prompts=[words, words + "and more words"], metadata=[None, None]
    )
    raw = scorer.score(batch).samples["pickscore/raw"]
    assert raw[0] == raw[1]  # only the first 75 word tokens count, as in the reference


def test_preprocessing_equals_transformers_clip_processor() -> None:
    """The PIL-backend CLIPImageProcessor with the ViT-H settings (what PickScore's reference ran) is matched
    exactly. transformers 5's default torchvision backend resizes uint8 tensors with torch's antialiased
    bicubic (float weights, rounding once at the end): up to 2 grey levels away on these images."""
    pil_processor = CLIPImageProcessorPil(**VIT_H_PROCESSOR)
    torchvision_processor = CLIPImageProcessor(**VIT_H_PROCESSOR)
    one_level = 1 / 255 / OPENAI_STD.min()
    worst_levels = 0.0
    for image in sample_images(3):
        ours = center_crop_transform(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
        reference = torch.from_numpy(pil_processor(images=image, return_tensors="np")["pixel_values"][0])
        assert (ours - reference).abs().max().item() < 1e-6
        assert (ours - torch.from_numpy(pil_clip_pixels(image))).abs().max().item() < 1e-6
        default = torchvision_processor(images=torch.from_numpy(image).permute(2, 0, 1), return_tensors="pt")
        worst_levels = max(worst_levels, (ours - default["pixel_values"][0]).abs().max().item() / one_level)
    assert worst_levels <= 2 + 1e-3


@pytest.mark.parametrize("height, width", PREPROCESSING_SIZES)
def test_preprocessing_equals_the_pil_clip_processor_exactly(height: int, width: int) -> None:
    """transformers' PIL-backend CLIPImageProcessor with PickScore's ViT-H settings, bit for bit.

    On these sizes every Pillow resizes in its classic pass order. Pillow ≥ 13 runs the vertical pass first
    on some tall images (1023×333, 600×229); there the classic order is kept (next test; docs/scorers.md).
    """
    image = random_image(height, width)
    processor = CLIPImageProcessorPil(**VIT_H_PROCESSOR)
    reference = processor(images=image, return_tensors="np", input_data_format="channels_last")
    ours = center_crop_transform(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
    assert torch.equal(ours, torch.from_numpy(reference["pixel_values"][0]))


def test_resize_matches_pil_bicubic_in_pillows_classic_pass_order() -> None:
    """Exact against PIL for every kind of size change; for tall images the classic order (horizontal pass,
    then vertical) is reproduced with two single-axis PIL resizes, each of which is one PIL pass."""
    rng = np.random.default_rng(4)
    for (height, width), (new_h, new_w) in [
        ((37, 53), (224, 301)),  # upscale
        ((300, 410), (224, 306)),  # downscale
        ((90, 300), (224, 746)),  # wide
        ((400, 60), (224, 34)),  # tall, height shrinks more than width
        ((50, 700), (11, 13)),  # extreme
    ]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pil = (
            Image.fromarray(image)
            .resize((new_w, height), Image.BICUBIC)
            .resize((new_w, new_h), Image.BICUBIC)
        )
        ours = resize_bicubic(torch.from_numpy(image).permute(2, 0, 1)[None], new_h, new_w)[0].permute(
            1, 2, 0
        )
        np.testing.assert_array_equal(ours.numpy(), np.asarray(pil))


def test_real_checkpoint_path_loads_a_local_directory(tmp_path: Path) -> None:
    """The --checkpoint code path on a directory laid out like PickScore_v1 + the processor's tokenizer."""
    tiny = build_tiny()
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = PickScoreScorer.build(checkpoint=str(tmp_path))
    assert loaded.identity.checkpoint_sha256 == file_sha256(tmp_path / "model.safetensors")
    image = torch.from_numpy(sample_images(5)[1]).permute(2, 0, 1)
    batch = ScoreBatch(images=[image], prompts=["a photo of a dog"], metadata=[None])
    reference = PickScoreScorer(tiny.model, tiny.tokenizer, checkpoint_sha256="x", device="cpu")
    torch.testing.assert_close(
        loaded.score(batch).samples["pickscore"], reference.score(batch).samples["pickscore"]
    )

    half = tmp_path / "half"
    tiny.model.half().save_pretrained(half)
    tiny.tokenizer.save_pretrained(half)
    assert PickScoreScorer.build(checkpoint=str(half)).model.dtype == torch.float32  # scored in float32


def test_build_needs_exactly_one_of_tiny_or_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        build_scorer("pickscore")
    with pytest.raises(ValueError, match="exactly one"):
        build_scorer("pickscore", tiny=True, checkpoint=str(tmp_path))
