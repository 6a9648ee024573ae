"""DINOv3 group diversity and DivGenBench PVS, served through the spine, against numpy computations."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DINOv3ViTImageProcessor

from services.client import GrpcRewardClient
from services.core.batcher import BatcherConfig
from services.core.request import RequestLimits
from services.core.scorer import ScoreBatch
from services.core.server import ServerConfig
from services.dino import DinoScorer
from services.dino.diversity import photographic_variance_score
from services.dino.features import preprocess
from services.registry import build_scorer
from tests.conftest import PREPROCESSING_SIZES, random_image, running_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scorer() -> DinoScorer:
    return DinoScorer.build(tiny=True)


def random_images(count: int, seed: int) -> list[np.ndarray]:
    """HWC uint8 images of assorted sizes and contents."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        height, width = (48, 64) if i % 2 else (40, 40)
        base = rng.integers(0, 256, size=3)
        noise = rng.normal(0, rng.uniform(5, 80), size=(height, width, 3))
        out.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return out


def reference_features(scorer: DinoScorer, arrays: list[np.ndarray]) -> np.ndarray:
    """transformers' own DINOv3 processor, then the model's CLS token after the final norm."""
    processor = DINOv3ViTImageProcessor()
    pixels = torch.cat([processor(images=a, return_tensors="pt")["pixel_values"] for a in arrays])
    with torch.no_grad():
        out = scorer.model(pixel_values=pixels)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])
    return out.pooler_output.double().numpy()


def numpy_diversity(features: np.ndarray) -> float:
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    n = len(unit)
    distances = [1.0 - unit[i] @ unit[j] for i in range(n) for j in range(i + 1, n)]
    return float(np.mean(distances)) if distances else 0.0


def numpy_pvs(arrays: list[np.ndarray]) -> float:
    """std over images (ddof 0) of: mean HSV S, mean HSV V, std of BT.601 grey; pixels in [0, 1]."""
    stats = []
    for array in arrays:
        rgb = array.astype(np.float64) / 255.0
        v = rgb.max(axis=2)
        s = np.where(v > 0, (v - rgb.min(axis=2)) / np.where(v > 0, v, 1.0), 0.0)
        grey = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        stats.append((s.mean(), v.mean(), grey.std()))
    return float(np.std(np.array(stats), axis=0).sum())


def test_preprocessing_matches_the_dinov3_image_processor() -> None:
    processor = DINOv3ViTImageProcessor()
    assert (processor.size.height, processor.size.width) == (224, 224) and not processor.do_center_crop
    assert tuple(processor.image_mean) == (0.485, 0.456, 0.406)
    assert tuple(processor.image_std) == (0.229, 0.224, 0.225)
    arrays = [random_images(2, seed=5)[1], np.zeros((300, 120, 3), np.uint8) + 77]  # non-square, up and down
    ours = preprocess([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])
    theirs = torch.cat([processor(images=a, return_tensors="pt")["pixel_values"] for a in arrays])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("height, width", PREPROCESSING_SIZES)
def test_preprocessing_equals_the_processor_exactly(height: int, width: int) -> None:
    """Odd and extreme aspect ratios squashed to 224² (no crop), bit for bit as the processor does."""
    image = random_image(height, width)
    processor = DINOv3ViTImageProcessor()
    reference = processor(images=image, return_tensors="pt", input_data_format="channels_last")
    ours = preprocess([torch.from_numpy(image).permute(2, 0, 1)])
    assert torch.equal(ours, reference["pixel_values"])


def test_groups_interleaved_and_split_across_requests_keep_their_members(scorer: DinoScorer) -> None:
    arrays = random_images(13, seed=1)
    arrays[4] = arrays[0].copy()  # group "a" holds two identical images
    group_ids = ["a", "b", "c", "a", "a", "b", "", "c", "b", "d", "c", "b", "a"]
    expected_features = reference_features(scorer, arrays)
    members = {g: [i for i, x in enumerate(group_ids) if x == g] for g in set(group_ids) - {""}}

    async def main():
        # ≤ 5 images per request: the client splits the call into several requests, each holding whole groups;
        # ≤ 7 images per model batch: jobs of different requests share model calls.
        config = ServerConfig(
            port=0,
            limits=RequestLimits(max_images_per_request=5),
            batcher=BatcherConfig(max_batch_images=7, max_delay_ms=20),
        )
        async with running_server(scorer, config, name="dino") as server:
            async with GrpcRewardClient(f"127.0.0.1:{server.port}") as client:
                return await client.score(arrays, "a prompt", group_ids=group_ids)

    scores = asyncio.run(asyncio.wait_for(main(), 60))
    assert set(scores.groups) == set(members)
    per_sample = scores.values["dino/mean_distance_to_group"]
    for gid, indices in members.items():
        features = expected_features[indices]
        assert scores.groups[gid]["dino/diversity"] == pytest.approx(numpy_diversity(features), abs=1e-5)
        assert scores.groups[gid]["pvs"] == pytest.approx(numpy_pvs([arrays[i] for i in indices]), abs=1e-9)
        unit = features / np.linalg.norm(features, axis=1, keepdims=True)
        for row, i in enumerate(indices):
            others = [1 - unit[row] @ unit[k] for k in range(len(indices)) if k != row]
            assert per_sample[i] == pytest.approx(np.mean(others) if others else 0.0, abs=1e-5)
        assert np.mean(per_sample[indices]) == pytest.approx(scores.groups[gid]["dino/diversity"], abs=1e-9)
    assert per_sample[6] == 0.0 and per_sample[9] == 0.0  # no group / a group of one: nothing to differ from


def test_diversity_is_zero_for_identical_images_and_grows_with_dissimilar_ones(scorer: DinoScorer) -> None:
    rng = np.random.default_rng(7)
    base = random_images(1, seed=3)[0]
    slightly = [np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8) for _ in range(3)]
    unlike = random_images(4, seed=11)[1:]
    groups = {"same": [base] * 3, "close": [base, *slightly[:2]], "far": [base, *unlike[:2]], "one": [base]}
    arrays = [a for g in groups.values() for a in g]
    ids = [g for g, items in groups.items() for _ in items]
    batch = ScoreBatch(
        images=[torch.from_numpy(a).permute(2, 0, 1) for a in arrays],
        prompts=[""] * len(arrays),
        metadata=[None] * len(arrays),
        group_ids=ids,
    )
    out = scorer.score(batch)
    diversity = {g: out.groups[g]["dino/diversity"] for g in groups}
    assert diversity["same"] == pytest.approx(0.0, abs=1e-7) and out.groups["same"]["pvs"] == 0.0
    assert diversity["one"] == 0.0 and out.groups["one"]["pvs"] == 0.0
    assert diversity["same"] < diversity["close"] < diversity["far"]
    assert out.samples["dino/mean_distance_to_group"][-1] == 0.0


def test_pvs_by_hand() -> None:
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255  # S = 1, V = 1, grey constant
    black = np.zeros((4, 4, 3), np.uint8)  # S = 0 (V = 0), V = 0, grey constant
    split = np.zeros((4, 4, 3), np.uint8)
    split[:2] = 255  # half white, half black: S = 0, V = 0.5, grey std = 0.5
    # population stds: S of (1, 0, 0), V of (1, 0, 0.5), grey std of (0, 0, 0.5)
    expected = math.sqrt(2 / 9) + math.sqrt(1 / 6) + math.sqrt(1 / 18)
    images = [torch.from_numpy(a).permute(2, 0, 1) for a in (red, black, split)]
    assert photographic_variance_score(images) == pytest.approx(expected, abs=1e-12)
    assert photographic_variance_score(images[:1]) == 0.0


def test_registry_builds_tiny_and_refuses_ambiguous_requests() -> None:
    scorer = build_scorer("dino", tiny=True)
    assert scorer.model.config.num_register_tokens == 4
    assert scorer.identity.group_outputs == ("dino/diversity", "pvs")
    with pytest.raises(ValueError, match="exactly one"):
        build_scorer("dino")
