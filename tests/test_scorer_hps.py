"""HPSv2.1 served through the spine equals HPS computed step by step in HPSv2's order (REFERENCE.md §4)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from services.client import GrpcRewardClient
from services.clip_shared.transforms import pad_transform
from services.core.hashing import file_sha256
from services.core.scorer import ScoreBatch
from services.hps import HPSScorer
from services.hps.checkpoint import build_tiny, load_state, tiny_model
from services.registry import build_scorer
from tests.conftest import PREPROCESSING_SIZES, random_image, running_server

ROOT = Path(__file__).resolve().parents[1]
OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def hpsv2_pixels(image: np.ndarray) -> np.ndarray:
    """HPSv2's eval transform in HPSv2's order (``hpsv2/src/open_clip/transform.py``), from torchvision:
    (H, W, 3) uint8 → (3, 224, 224) float32.

    ``ToTensor()``, then ``ResizeMaxSize(224)`` on that float tensor — scale = 224 / long side, each side
    rounded, ``F.resize`` bicubic (antialias at its default), ``F.pad`` with [left, top, right, bottom] and
    fill 0, skipped when the scale is 1 — then ``Normalize`` with OpenAI's mean/std.
    """
    pixels = TF.to_tensor(Image.fromarray(image).convert("RGB"))
    height, width = pixels.shape[1:]
    scale = 224 / float(max(height, width))
    if scale != 1.0:
        new_size = [round(dim * scale) for dim in (height, width)]
        pixels = TF.resize(pixels, new_size, InterpolationMode.BICUBIC)
        pad_h, pad_w = 224 - new_size[0], 224 - new_size[1]
        pixels = TF.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(pixels, OPENAI_MEAN.tolist(), OPENAI_STD.tolist()).numpy()


def sample_images(seed: int) -> list[np.ndarray]:
    """Non-square sizes (so padding shows), up- and downscaled."""
    rng = np.random.default_rng(seed)
    out = []
    for height, width in ((64, 96), (96, 40), (80, 80), (240, 320), (200, 150)):
        yy, xx = np.mgrid[0:height, 0:width]
        base = (
            128 + 90 * np.sin(xx / rng.uniform(2, 9))[..., None] * np.cos(yy / rng.uniform(2, 9))[..., None]
        )
        out.append(np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8))
    return out


def independent_hps(scorer: HPSScorer, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
    """⟨f_img/‖f_img‖, f_txt/‖f_txt‖⟩ with each prompt tokenised and encoded on its own."""
    model = scorer.model
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    pixels = torch.from_numpy(np.stack([hpsv2_pixels(image) for image in images]))
    with torch.no_grad():
        image_features = model.encode_image(pixels)
        text_features = torch.cat([model.encode_text(tokenizer([p])) for p in prompts])
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return (image_features * text_features).sum(-1).double().numpy()


@pytest.fixture(scope="module")
def scorer() -> HPSScorer:
    scorer = build_scorer("hps", tiny=True)
    assert isinstance(scorer, HPSScorer)
    return scorer


def test_served_score_equals_an_independent_computation(scorer: HPSScorer) -> None:
    images = sample_images(0)
    long_prompt = "an oil painting of " + "a lighthouse by the sea and " * 30 + "gulls"
    prompts = ["a photo of a cat", "a red bicycle", long_prompt, "a photo of a cat", ""]
    expected = independent_hps(scorer, images, prompts)

    async def main():
        async with running_server(scorer, name="hps") as server:
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
    assert served.model.name == "hps" and served.model.checkpoint_sha256 == "tiny:0"
    assert np.ptp(expected) > 0.05, "the tiny model should tell these samples apart"
    np.testing.assert_allclose(served.values["hps"], expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(served_float.values["hps"], served.values["hps"])


def test_preprocessing_resizes_the_longest_side_and_zero_pads() -> None:
    """A 2:1 image becomes a centred 224×112 band between black bars: padded, not cropped."""
    image = np.full((100, 50, 3), 255, dtype=np.uint8)  # white, tall
    pixels = pad_transform(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
    black = torch.from_numpy(-OPENAI_MEAN / OPENAI_STD).view(3, 1)
    white = torch.from_numpy((1 - OPENAI_MEAN) / OPENAI_STD).view(3, 1)
    torch.testing.assert_close(pixels[:, :, :56].reshape(3, -1), black.expand(3, 224 * 56))
    torch.testing.assert_close(pixels[:, :, 168:].reshape(3, -1), black.expand(3, 224 * 56))
    torch.testing.assert_close(pixels[:, :, 56:168].reshape(3, -1), white.expand(3, 224 * 112))


@pytest.mark.parametrize("height, width", [*PREPROCESSING_SIZES, (1023, 333), (600, 229)])
def test_preprocessing_equals_hpsv2_order_exactly(height: int, width: int) -> None:
    """Odd, extreme, up- and downscaled sizes and 512²: the same pixels, bit for bit, as HPSv2's order."""
    image = random_image(height, width)
    ours = pad_transform(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
    assert torch.equal(ours, torch.from_numpy(hpsv2_pixels(image)))


def test_preprocessing_pads_an_image_whose_long_side_is_already_224() -> None:
    """HPSv2 returns such an image unpadded (non-square, which its ViT rejects); here it is left unresized
    and zero-padded, so its pixels are HPSv2's in the middle and black around."""
    image = random_image(224, 150)
    ours = pad_transform(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
    reference = torch.from_numpy(hpsv2_pixels(image))
    assert reference.shape == (3, 224, 150)
    assert torch.equal(ours[:, :, 37:187], reference)
    black = torch.from_numpy(-OPENAI_MEAN / OPENAI_STD).view(3, 1, 1)
    torch.testing.assert_close(ours[:, :, :37], black.expand(3, 224, 37), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[:, :, 187:], black.expand(3, 224, 37), rtol=0, atol=1e-6)


def test_hpsv2_order_is_not_mainline_open_clips() -> None:
    """Mainline open_clip resizes the PIL image first (uint8, clipped); HPSv2 resizes the float tensor. The
    two differ by whole grey levels on a downscaled 150×200 image, which is why the order is pinned."""
    mainline = open_clip.image_transform(
        224, is_train=False, mean=OPENAI_MEAN.tolist(), std=OPENAI_STD.tolist(), resize_mode="longest"
    )
    image = sample_images(2)[4]
    ours = pad_transform(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
    levels = ((ours - mainline(Image.fromarray(image))) * torch.tensor(OPENAI_STD).view(3, 1, 1) * 255).abs()
    assert levels.max().item() > 1.0


def test_mixed_sizes_and_prompts_in_one_batch_score_as_alone(scorer: HPSScorer) -> None:
    """Size groups (one larger than a resize chunk) and deduplicated prompts land back in input order."""
    arrays = sample_images(3)
    rng = np.random.default_rng(5)
    same_size = [np.clip(arrays[0] + rng.integers(-40, 40, arrays[0].shape), 0, 255).astype(np.uint8)]
    same_size += [np.roll(arrays[0], shift, axis=1) for shift in range(1, 10)]
    arrays = [arrays[0], *same_size[:5], arrays[1], arrays[2], *same_size[5:], arrays[3], arrays[4]]
    images = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
    prompts = [("a", "b", "c")[i % 3] for i in range(len(images))]
    batch = ScoreBatch(images=images, prompts=prompts, metadata=[None] * len(images))
    together = scorer.score(batch).samples["hps"]
    alone = [
        scorer.score(ScoreBatch(images=[i], prompts=[p], metadata=[None])).samples["hps"][0]
        for i, p in zip(images, prompts, strict=True)
    ]
    torch.testing.assert_close(together, torch.stack(alone), rtol=0, atol=1e-6)


def test_checkpoint_file_loads_strictly(tmp_path: Path) -> None:
    """The --checkpoint path on a file laid out like HPS_v2.1_compressed.pt ({'state_dict': ...})."""
    tiny = build_tiny()
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny.model.state_dict().items()}}, path)
    fresh = tiny_model()
    load_state(fresh, path)  # DDP "module." prefixes are accepted
    for key, value in tiny.model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)

    state = dict(tiny.model.state_dict())
    state.pop("text_projection")
    torch.save({"state_dict": state}, path)
    with pytest.raises(RuntimeError, match="text_projection"):
        load_state(tiny_model(), path)
    torch.save(state, path)
    with pytest.raises(ValueError, match="state_dict"):
        load_state(tiny_model(), path)
    assert len(file_sha256(path)) == 64


def test_build_needs_exactly_one_of_tiny_or_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        build_scorer("hps")
    with pytest.raises(FileNotFoundError, match=r"HPS_v2\.1_compressed\.pt"):
        build_scorer("hps", checkpoint=str(tmp_path))  # a directory without the file; no download
