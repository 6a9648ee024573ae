"""LAION aesthetic score served through the spine equals the predictor computed step by step
(REFERENCE.md §4), and the real head from ../shared/assets loads with upstream's key names."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from transformers.models.clip import CLIPImageProcessorPil

from services.aesthetic import AestheticScorer
from services.aesthetic.checkpoint import build_tiny
from services.aesthetic.head import AestheticHead, load_head
from services.client import GrpcRewardClient
from services.clip_shared.transforms import center_crop_transform
from services.core.hashing import file_sha256
from services.core.scorer import ScoreBatch
from services.registry import build_scorer
from tests.conftest import PREPROCESSING_SIZES, SHARED, random_image, running_server
from tests.test_scorer_pickscore import OPENAI_MEAN, OPENAI_STD, pil_clip_pixels, sample_images

ROOT = Path(__file__).resolve().parents[1]
REAL_HEAD = SHARED / "assets" / "laion-aesthetic-sac-logos-ava1-l14-linearMSE.pth"
# preprocessor_config.json of openai/clip-vit-large-patch14
VIT_L_PROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": OPENAI_MEAN.tolist(),
    "image_std": OPENAI_STD.tolist(),
    "resample": 3,
    "size": 224,
}
needs_real_head = pytest.mark.skipif(not REAL_HEAD.is_file(), reason=f"{REAL_HEAD} not present")


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def head_by_hand(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The head as its five affine maps in float64, no activations: (B, 768) → (B,)."""
    x = x.double()
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].double().T + state[f"layers.{i}.bias"].double()
    return x.squeeze(-1)


def independent_aesthetic(scorer: AestheticScorer, images: list[np.ndarray]) -> np.ndarray:
    """PIL CLIP preprocessing → projected image embedding → L2 normalise → head by hand."""
    pixels = torch.from_numpy(np.stack([pil_clip_pixels(image) for image in images]))
    with torch.no_grad():
        embedding = scorer.clip.get_image_features(pixel_values=pixels).pooler_output
    unit = embedding / embedding.norm(dim=-1, keepdim=True)
    return head_by_hand(scorer.head.state_dict(), unit).numpy()


@needs_real_head
def test_served_score_equals_an_independent_computation() -> None:
    """Tiny CLIP with the real head (whose ratings depend on the embedding far more than a random head's)."""
    tiny = build_tiny()
    scorer = AestheticScorer(tiny.clip, load_head(REAL_HEAD), checkpoint_sha256="test", device="cpu")
    images = sample_images(0)
    expected = independent_aesthetic(scorer, images)

    async def main():
        async with running_server(scorer, name="aesthetic") as server:
            async with GrpcRewardClient(f"127.0.0.1:{server.port}") as client:
                as_uint8 = await client.score(images, ["ignored", "", "x", "y", "z"])
                # float input in [0, 1] is quantised with round(x·255) before scoring
                noise = np.random.default_rng(1).uniform(-0.45, 0.45, (len(images),))
                floats = [
                    (image.astype(np.float32) + n) / 255.0 for image, n in zip(images, noise, strict=True)
                ]
                as_float = await client.score(floats, "any prompt")
                return as_uint8, as_float

    served, served_float = run(main())
    assert served.model.name == "aesthetic"
    assert np.ptp(expected) > 0.01, "the samples should be told apart"
    np.testing.assert_allclose(served.values["aesthetic"], expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(served_float.values["aesthetic"], served.values["aesthetic"])


def test_tiny_scorer_is_seeded_and_served() -> None:
    scorer = build_scorer("aesthetic", tiny=True)
    assert isinstance(scorer, AestheticScorer)
    assert scorer.identity.checkpoint_sha256 == "tiny:0" and scorer.identity.outputs == ("aesthetic",)
    images = sample_images(1)[:3]
    expected = independent_aesthetic(scorer, images)

    async def main():
        async with running_server(scorer, name="aesthetic") as server:
            async with GrpcRewardClient(f"127.0.0.1:{server.port}") as client:
                return await client.score(images, "p")

    np.testing.assert_allclose(run(main()).values["aesthetic"], expected, rtol=0, atol=1e-5)
    again = build_scorer("aesthetic", tiny=True)
    for key, value in scorer.head.state_dict().items():
        torch.testing.assert_close(again.head.state_dict()[key], value, rtol=0, atol=0)


@needs_real_head
def test_real_head_loads_strictly_and_is_the_hand_computed_affine_chain() -> None:
    state = torch.load(REAL_HEAD, map_location="cpu", weights_only=True)
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    assert shapes == {
        "layers.0.weight": (1024, 768),
        "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,),
        "layers.4.weight": (64, 128),
        "layers.4.bias": (64,),
        "layers.6.weight": (16, 64),
        "layers.6.bias": (16,),
        "layers.7.weight": (1, 16),
        "layers.7.bias": (1,),
    }
    head = load_head(REAL_HEAD).eval()
    unit = torch.nn.functional.normalize(torch.arange(768, dtype=torch.float32).sin().unsqueeze(0), dim=-1)
    rating = head(unit)
    by_hand = head_by_hand(state, unit)
    torch.testing.assert_close(rating.double(), by_hand, rtol=0, atol=1e-5)
    # no activations: the trained head is one affine map w·x + b
    w = state["layers.7.weight"].double()
    b = state["layers.7.bias"].double()
    for i in (6, 4, 2, 0):
        b = b + w @ state[f"layers.{i}.bias"].double()
        w = w @ state[f"layers.{i}.weight"].double()
    torch.testing.assert_close((unit.double() @ w.T + b).squeeze(-1), by_hand, rtol=0, atol=1e-9)

    missing = dict(state)
    missing.pop("layers.7.bias")
    with pytest.raises(RuntimeError, match=r"layers\.7\.bias"):
        AestheticHead().load_state_dict(missing, strict=True)


def test_preprocessing_equals_transformers_clip_processor() -> None:
    """CLIPImageProcessor (PIL backend) with openai/clip-vit-large-patch14's settings, exactly."""
    processor = CLIPImageProcessorPil(**VIT_L_PROCESSOR)
    for image in sample_images(3):
        ours = center_crop_transform(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
        reference = torch.from_numpy(processor(images=image, return_tensors="np")["pixel_values"][0])
        assert (ours - reference).abs().max().item() < 1e-6


@pytest.mark.parametrize("height, width", PREPROCESSING_SIZES)
def test_preprocessing_equals_the_pil_clip_processor_exactly(height: int, width: int) -> None:
    """CLIPImageProcessor (PIL backend) with openai/clip-vit-large-patch14's settings, bit for bit."""
    image = random_image(height, width)
    processor = CLIPImageProcessorPil(**VIT_L_PROCESSOR)
    reference = processor(images=image, return_tensors="np", input_data_format="channels_last")
    ours = center_crop_transform(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
    assert torch.equal(ours, torch.from_numpy(reference["pixel_values"][0]))


def openai_clip_preprocess() -> T.Compose:
    """OpenAI CLIP's ``_transform(224)``, which LAION's own aesthetic inference runs, from torchvision."""
    return T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            lambda image: image.convert("RGB"),
            T.ToTensor(),
            T.Normalize(OPENAI_MEAN.tolist(), OPENAI_STD.tolist()),
        ]
    )


@pytest.mark.parametrize("width, offset", [(225, 0), (226, 0), (227, 1), (229, 0), (231, 1)])
def test_crop_sits_one_pixel_left_of_openai_clips_when_the_margin_is_3_mod_4(width: int, offset: int) -> None:
    """transformers crops at ``margin // 2``; torchvision's CenterCrop at ``round(margin / 2)``, which rounds
    half to even, so the two differ by one pixel exactly when the margin is ≡ 3 (mod 4). Same resize."""
    image = random_image(224, width)
    ours = center_crop_transform(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
    laion = openai_clip_preprocess()(Image.fromarray(image))
    assert torch.equal(ours[:, :, offset:], laion[:, :, : 224 - offset])
    assert offset == 0 or not torch.equal(ours, laion)


def save_tiny_clip_with_head(directory: Path) -> AestheticScorer:
    tiny = build_tiny()
    tiny.clip.save_pretrained(directory)
    torch.save(tiny.head.state_dict(), directory / "sac+logos+ava1-l14-linearMSE.pth")
    return AestheticScorer(tiny.clip, tiny.head, checkpoint_sha256="x", device="cpu")


def test_real_checkpoint_path_loads_clip_directory_and_head(tmp_path: Path) -> None:
    reference = save_tiny_clip_with_head(tmp_path)
    head_path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    loaded = AestheticScorer.build(checkpoint=str(tmp_path))  # head found beside the CLIP files
    lines = f"{file_sha256(tmp_path / 'model.safetensors')}  model.safetensors\n"
    lines += f"{file_sha256(head_path)}  {head_path.name}\n"
    assert loaded.identity.checkpoint_sha256 == hashlib.sha256(lines.encode()).hexdigest()
    image = torch.from_numpy(sample_images(4)[0]).permute(2, 0, 1)
    batch = ScoreBatch(images=[image], prompts=[""], metadata=[None])
    torch.testing.assert_close(
        loaded.score(batch).samples["aesthetic"], reference.score(batch).samples["aesthetic"]
    )

    elsewhere = tmp_path / "heads" / "my-head.pth"
    elsewhere.parent.mkdir()
    shutil.move(head_path, elsewhere)
    with pytest.raises(ValueError, match="--head"):
        AestheticScorer.build(checkpoint=str(tmp_path))
    explicit = AestheticScorer.build(checkpoint=str(tmp_path), head=elsewhere)
    torch.testing.assert_close(
        explicit.score(batch).samples["aesthetic"], reference.score(batch).samples["aesthetic"]
    )


def test_build_needs_exactly_one_of_tiny_or_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        build_scorer("aesthetic")
    with pytest.raises(ValueError, match="--head"):
        build_scorer("aesthetic", tiny=True, head=str(tmp_path / "h.pth"))


@needs_real_head
@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~5-10 s on 2 busy cores
def test_served_from_the_command_line_with_a_head_option(tmp_path: Path) -> None:
    build_tiny().clip.save_pretrained(tmp_path)
    args = ["aesthetic", "--checkpoint", str(tmp_path), "--head", str(REAL_HEAD), "--port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.serve", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), proc.stderr.read() if proc.poll() is not None else line
        endpoint = line.split("listening on ", 1)[1].strip()

        async def describe():
            async with GrpcRewardClient(endpoint) as client:
                return await client.describe()

        info = run(describe(), 30)
        assert (info.name, list(info.outputs)) == ("aesthetic", ["aesthetic"])
        assert len(info.checkpoint_sha256) == 64
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
