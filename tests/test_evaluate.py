"""Held-out evaluation: images per tag, scores in image order, per-prompt diversity."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from services.core.server import ServerConfig
from services.geneval.prompts import images_per_record
from tests.conftest import MeanPixelScorer, running_server
from tests.tiny_sd3 import tiny_model
from trainer.config import build_config
from trainer.evaluate import evaluate_model, markdown_table, summarise
from trainer.model import POLICY, merge_adapter, use_adapter
from trainer.rewards import RewardSpec

ROOT = Path(__file__).resolve().parents[1]

RECORDS = [
    {"prompt": "a red circle", "tag": "colors"},
    {"prompt": "a blue square", "tag": "colors"},
    {"prompt": "a green cross", "tag": "colors"},
    {"prompt": "two triangles", "tag": "counting"},
]


def test_sparse_tags_get_more_samples_per_prompt():
    assert images_per_record(RECORDS, 1, 0) == [1, 1, 1, 1]
    assert images_per_record(RECORDS, 4, 0) == [4, 4, 4, 4]
    # 7 images per tag: colours has 3 prompts (ceil(7/3) = 3 each), counting one (7).
    assert images_per_record(RECORDS, 2, 7) == [3, 3, 3, 7]
    assert images_per_record(RECORDS, 4, 7) == [4, 4, 4, 7]


def _pairwise_rms(images: torch.Tensor) -> float:
    pairs = itertools.combinations(images.double() / 255.0, 2)
    return float(np.mean([((a - b) ** 2).mean().sqrt().item() for a, b in pairs]))


@pytest.mark.parametrize(("samples", "min_per_tag"), [(1, 0), (2, 4)])
def test_evaluate_model_scores_every_image_once_in_order(samples: int, min_per_tag: int):
    cfg = build_config("shapes")

    async def run():
        async with running_server(MeanPixelScorer(), ServerConfig(port=0)) as server:
            cfg.reward.rewards = [RewardSpec(name="meanpixel", endpoint=f"127.0.0.1:{server.port}")]
            return await evaluate_model(
                tiny_model(),
                cfg,
                RECORDS,
                steps=3,
                seed=0,
                samples_per_prompt=samples,
                min_images_per_tag=min_per_tag,
            )

    summary, images, expanded, per_image = asyncio.run(run())
    assert per_image["meanpixel"].shape == (len(images),)
    counts = images_per_record(RECORDS, samples, min_per_tag)
    assert summary["images"] == len(images) == len(expanded) == sum(counts)
    expected = [r["prompt"] for r, n in zip(RECORDS, counts, strict=True) for _ in range(n)]
    assert [r["prompt"] for r in expanded] == expected
    assert summary["meanpixel"] == pytest.approx(float((images.double() / 255).mean()), abs=1e-6)
    if samples == 1:
        assert "diversity/pixel_rms" not in summary  # one image per prompt: nothing to compare
    else:
        groups = images.split(counts)
        assert summary["diversity/pixel_rms"] == pytest.approx(np.mean([_pairwise_rms(g) for g in groups]))


def test_merged_adapter_gives_the_unmerged_velocity():
    model = tiny_model()
    with torch.no_grad():
        for name, param in model.transformer.named_parameters():
            if f".{POLICY}." in name:  # a non-trivial θ (lora_B starts at zero)
                param.copy_(torch.randn_like(param) * 0.1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, *model.sample_shape), generator=generator)
    cond = model.text.encode(["a red circle", "two squares"])
    t = torch.tensor([0.3, 0.8])
    use_adapter(model.transformer, POLICY)
    layer = model.transformer.transformer_blocks[0].attn.to_q
    w0, a, b = (
        t.detach().clone()
        for t in (layer.base_layer.weight, layer.lora_A[POLICY].weight, layer.lora_B[POLICY].weight)
    )
    with torch.no_grad():
        unmerged = model.velocity(x, t, cond.prompt_embeds, cond.pooled)
        bare = model.transformer
        bare.disable_adapters()
        base = model.velocity(x, t, cond.prompt_embeds, cond.pooled)
        bare.enable_adapters()
        merge_adapter(model.transformer, POLICY)
        merged = model.velocity(x, t, cond.prompt_embeds, cond.pooled)
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the adapter matters
    # W ← W0 + (α / r)·B·A, only θ's adapter folded in.
    torch.testing.assert_close(layer.base_layer.weight, w0 + layer.scaling[POLICY] * b @ a)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)


def test_summary_scores_per_tag_and_leaves_tag_indicators_out():
    # Hand-computed: colours 2 of 3 correct, counting 0 of 1; overall = mean over the tags present.
    outputs = {
        "geneval/correct": np.array([1.0, 0.0, 1.0, 0.0]),
        "geneval/score": np.array([1.0, 0.5, 1.0, 0.25]),
        "geneval/tag/colors": np.array([1.0, 1.0, 1.0, 0.0]),
        "geneval/tag/counting": np.array([0.0, 0.0, 0.0, 1.0]),
    }
    summary = summarise(RECORDS, outputs)
    assert summary["geneval/score"] == pytest.approx(2.75 / 4)
    assert summary["geneval/per_tag"] == pytest.approx({"colors": 2 / 3, "counting": 0.0})
    assert summary["geneval/images_per_tag"] == {"colors": 3, "counting": 1}
    assert summary["geneval/overall"] == pytest.approx(1 / 3)
    assert not any(key.startswith("geneval/tag/") for key in summary)
    table = markdown_table(summary)
    assert "| geneval/images_per_tag/colors | 3 |" in table and "| geneval/per_tag/colors | 0.667 |" in table


def test_evaluate_on_an_unreachable_endpoint_ends_in_one_sentence(tmp_path: Path) -> None:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", "--preset", "shapes", "--num-prompts", "1", "--steps", "1",
         "--min-images-per-tag", "0", "--out", str(tmp_path / "eval"), "--connect-timeout-s", "2",
         "--reward-endpoint", "geneval=127.0.0.1:1,output=geneval/score"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [
        line for line in proc.stderr.splitlines() if line.startswith("error:")
    ]  # past weight-loading bars
    assert line.startswith("error: reward 'geneval' at 127.0.0.1:1: ") and "--reward-endpoint" in line, line
    assert time.perf_counter() - started < 60
