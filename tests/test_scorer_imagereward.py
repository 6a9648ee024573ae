"""ImageReward served through the spine equals the published formula, computed step by step here."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from services.client import GrpcRewardClient
from services.core.hashing import file_sha256
from services.core.scorer import ScoreBatch
from services.imagereward import ImageRewardScorer
from services.imagereward.checkpoint import (
    CheckpointFiles,
    from_upstream_keys,
    load_model,
    resolve_files,
    to_upstream_keys,
)
from services.imagereward.med import TextConfig
from services.imagereward.model import ImageRewardModel, build_tiny, tiny_configs
from services.imagereward.preprocess import preprocess_image, write_tiny_vocab
from services.imagereward.vit import VisionConfig
from services.registry import build_scorer
from tests.conftest import PREPROCESSING_SIZES, random_image, running_server

ROOT = Path(__file__).resolve().parents[1]

# REFERENCE.md §4 / upstream ImageReward.py
MEAN, STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

# ImageReward's med_config.json (BLIP's BERT-base config with cross-attention and the two added tokens).
MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}


@pytest.fixture(scope="module")
def scorer() -> ImageRewardScorer:
    return ImageRewardScorer.build(tiny=True)


def images() -> list[np.ndarray]:
    """HWC uint8: landscape (downscaled), square at 224, portrait (upscaled), with structure in them."""
    rng = np.random.default_rng(0)
    out = []
    for height, width in ((180, 300), (224, 224), (90, 60)):
        y, x = np.mgrid[0:height, 0:width]
        smooth = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 255
        out.append(np.clip(smooth + rng.normal(0, 30, smooth.shape), 0, 255).astype(np.uint8))
    return out


PROMPTS = [
    "a photo of a red cat",
    "two dogs next to a blue car on a street at night " * 4,  # > 35 tokens: truncated
    "zebra",  # out of the tiny vocabulary: [UNK]
]


def reference_pixels(image: np.ndarray, resample: int = Image.BICUBIC) -> torch.Tensor:
    """Shorter side → 224 bicubic, centre crop 224, /255, OpenAI CLIP mean/std; (3, 224, 224)."""
    height, width = image.shape[:2]
    size = (224, int(224 * height / width)) if width <= height else (int(224 * width / height), 224)
    resized = np.asarray(Image.fromarray(image).resize(size, resample))
    top = round((resized.shape[0] - 224) / 2.0)
    left = round((resized.shape[1] - 224) / 2.0)
    crop = resized[top : top + 224, left : left + 224].astype(np.float32) / 255.0
    return torch.from_numpy((crop - CLIP_MEAN) / CLIP_STD).permute(2, 0, 1)


def reference_rewards(scorer: ImageRewardScorer, pixels: torch.Tensor) -> np.ndarray:
    tokens = scorer.tokenizer(
        PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.shape == (3, 35) and (ids[:, 0] == scorer.tokenizer.cls_token_id).all()  # [CLS] kept first
    model = scorer.model
    with torch.no_grad():
        image_embeds = model.visual_encoder(pixels)
        states = model.text_encoder(ids, mask, image_embeds)
        raw = model.mlp(states[:, 0]).squeeze(-1)
    return ((raw - MEAN) / STD).double().numpy()


def test_served_reward_equals_the_step_by_step_formula(scorer: ImageRewardScorer) -> None:
    arrays = images()
    expected = reference_rewards(scorer, torch.stack([reference_pixels(a) for a in arrays]))

    async def main() -> np.ndarray:
        async with running_server(scorer, name="imagereward") as server:
            async with GrpcRewardClient(f"127.0.0.1:{server.port}") as client:
                scores = await client.score(arrays, PROMPTS)
        assert scores.model.name == "imagereward" and list(scores.model.outputs) == ["imagereward"]
        return scores.values["imagereward"]

    served = asyncio.run(asyncio.wait_for(main(), 60))
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)
    # The comparison has the power to tell the resampling filter apart.
    bilinear = reference_rewards(scorer, torch.stack([reference_pixels(a, Image.BILINEAR) for a in arrays]))
    assert np.abs(bilinear - expected)[0] > 1e-5


def test_standardisation_constants_are_applied(scorer: ImageRewardScorer) -> None:
    model = build_tiny(len(scorer.tokenizer), seed=1)
    last = model.mlp.layers[7]
    batch = ScoreBatch(images=[torch.zeros(3, 32, 32, dtype=torch.uint8)], prompts=["a cat"], metadata=[None])
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(MEAN)
    tiny = ImageRewardScorer(model, scorer.tokenizer, checkpoint_sha256="test")
    assert tiny.score(batch).samples["imagereward"].item() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        last.bias.fill_(MEAN + STD)
    assert tiny.score(batch).samples["imagereward"].item() == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("height, width", PREPROCESSING_SIZES)
def test_image_preprocessing_equals_upstreams_transform_exactly(height: int, width: int) -> None:
    """ImageReward's ``_transform(224)`` as upstream composes it from torchvision, on a PIL image."""
    upstream = T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            lambda image: image.convert("RGB"),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN.tolist(), CLIP_STD.tolist()),
        ]
    )
    image = random_image(height, width)
    ours = preprocess_image(torch.from_numpy(image).permute(2, 0, 1))
    assert torch.equal(ours, upstream(Image.fromarray(image)))


def test_padding_tokens_do_not_change_the_reward(scorer: ImageRewardScorer) -> None:
    tokens = scorer.tokenizer(["a red cat"], padding="max_length", max_length=35, return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    altered = ids.clone()
    altered[mask == 0] = 7  # any real word where the mask says padding
    pixels = reference_pixels(images()[1])[None]
    with torch.no_grad():
        a = scorer.model(pixels, ids, mask)
        b = scorer.model(pixels, altered, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def upstream_layout(vision: VisionConfig, text: TextConfig) -> dict[str, tuple[int, ...]]:
    """Every key of upstream's ``ImageReward.state_dict()`` with its shape, from BLIP's published modules."""
    w, t = vision.width, text.hidden_size
    keys: dict[str, tuple[int, ...]] = {
        "blip.visual_encoder.cls_token": (1, 1, w),
        "blip.visual_encoder.pos_embed": (1, vision.num_patches + 1, w),
        "blip.visual_encoder.patch_embed.proj.weight": (w, 3, vision.patch_size, vision.patch_size),
        "blip.visual_encoder.patch_embed.proj.bias": (w,),
        "blip.visual_encoder.norm.weight": (w,),
        "blip.visual_encoder.norm.bias": (w,),
        "blip.vision_proj.weight": (256, w),
        "blip.vision_proj.bias": (256,),
        "blip.text_proj.weight": (256, t),
        "blip.text_proj.bias": (256,),
        "blip.text_encoder.embeddings.position_ids": (1, text.max_position_embeddings),
        "blip.text_encoder.embeddings.word_embeddings.weight": (text.vocab_size, t),
        "blip.text_encoder.embeddings.position_embeddings.weight": (text.max_position_embeddings, t),
        "blip.text_encoder.embeddings.LayerNorm.weight": (t,),
        "blip.text_encoder.embeddings.LayerNorm.bias": (t,),
    }
    for i in range(vision.depth):
        p = f"blip.visual_encoder.blocks.{i}."
        hidden = int(w * vision.mlp_ratio)
        for name, shape in {
            "norm1.weight": (w,), "norm1.bias": (w,), "norm2.weight": (w,), "norm2.bias": (w,),
            "attn.qkv.weight": (3 * w, w), "attn.qkv.bias": (3 * w,),
            "attn.proj.weight": (w, w), "attn.proj.bias": (w,),
            "mlp.fc1.weight": (hidden, w), "mlp.fc1.bias": (hidden,),
            "mlp.fc2.weight": (w, hidden), "mlp.fc2.bias": (w,),
        }.items():  # fmt: skip
            keys[p + name] = shape
    for i in range(text.num_layers):
        p = f"blip.text_encoder.encoder.layer.{i}."
        for block, kv in (("attention", t), ("crossattention", text.encoder_width)):
            keys[p + f"{block}.self.query.weight"] = (t, t)
            keys[p + f"{block}.self.key.weight"] = (t, kv)
            keys[p + f"{block}.self.value.weight"] = (t, kv)
            for name in ("query", "key", "value"):
                keys[p + f"{block}.self.{name}.bias"] = (t,)
            keys[p + f"{block}.output.dense.weight"] = (t, t)
            keys[p + f"{block}.output.dense.bias"] = (t,)
            keys[p + f"{block}.output.LayerNorm.weight"] = (t,)
            keys[p + f"{block}.output.LayerNorm.bias"] = (t,)
        keys[p + "intermediate.dense.weight"] = (text.intermediate_size, t)
        keys[p + "intermediate.dense.bias"] = (text.intermediate_size,)
        keys[p + "output.dense.weight"] = (t, text.intermediate_size)
        keys[p + "output.dense.bias"] = (t,)
        keys[p + "output.LayerNorm.weight"] = (t,)
        keys[p + "output.LayerNorm.bias"] = (t,)
    for index, (fan_in, fan_out) in zip(
        (0, 2, 4, 6, 7), ((t, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)), strict=True
    ):
        keys[f"mlp.layers.{index}.weight"] = (fan_out, fan_in)
        keys[f"mlp.layers.{index}.bias"] = (fan_out,)
    return keys


def test_real_upstream_layout_maps_onto_every_key_with_its_shape() -> None:
    vision = VisionConfig()
    text = TextConfig.from_med_config(MED_CONFIG, encoder_width=vision.width)
    assert (vision.width, vision.depth, vision.num_heads, vision.patch_size) == (1024, 24, 16, 16)
    assert (text.vocab_size, text.encoder_width, text.num_layers) == (30524, 1024, 12)
    layout = upstream_layout(vision, text)
    state = {key: torch.empty(shape, device="meta") for key, shape in layout.items()}
    with torch.device("meta"):
        model = ImageRewardModel(vision, text)
    mapped = from_upstream_keys(state)
    assert set(mapped) == set(model.state_dict())  # nothing missing, nothing unexpected
    model.load_state_dict(mapped, strict=True, assign=True)  # and every shape agrees
    assert set(to_upstream_keys(model.state_dict())) == set(layout) - {
        "blip.text_encoder.embeddings.position_ids",
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
    }


def test_checkpoint_files_in_upstream_layout_load_strictly(scorer: ImageRewardScorer, tmp_path: Path) -> None:
    vision, text = tiny_configs(len(scorer.tokenizer))
    state = to_upstream_keys(scorer.model.state_dict())
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(text.max_position_embeddings)[None]
    state["blip.vision_proj.weight"] = torch.zeros(256, vision.width)
    torch.save(state, tmp_path / "ImageReward.pt")
    med = dict(MED_CONFIG, vocab_size=text.vocab_size, hidden_size=text.hidden_size)
    med.update(num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads)
    med.update(intermediate_size=text.intermediate_size, max_position_embeddings=text.max_position_embeddings)
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    with pytest.raises(ValueError, match=r"vocab\.txt"):
        resolve_files(str(tmp_path))
    write_tiny_vocab(tmp_path)
    assert resolve_files(str(tmp_path / "ImageReward.pt")) == resolve_files(str(tmp_path))
    files = resolve_files(str(tmp_path))
    assert files == CheckpointFiles(
        weights=tmp_path / "ImageReward.pt", med_config=tmp_path / "med_config.json", vocab_dir=tmp_path
    )
    loaded = ImageRewardScorer(
        load_model(files, vision), scorer.tokenizer, checkpoint_sha256=file_sha256(files.weights)
    )
    batch = ScoreBatch(
        images=[torch.from_numpy(a).permute(2, 0, 1) for a in images()], prompts=PROMPTS, metadata=[None] * 3
    )
    torch.testing.assert_close(loaded.score(batch).samples, scorer.score(batch).samples, rtol=0, atol=0)
    del state["mlp.layers.7.bias"]
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(RuntimeError, match=r"mlp\.layers\.7\.bias"):
        load_model(files, vision)


def test_registry_builds_tiny_and_refuses_ambiguous_requests() -> None:
    assert build_scorer("imagereward", tiny=True).identity.checkpoint_sha256 == "tiny:0"
    with pytest.raises(ValueError, match="exactly one"):
        build_scorer("imagereward")
