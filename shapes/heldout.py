"""GenEval-shapes of a shapes model: sample the test prompts, detect, score with the GenEval rules.

Sampling is the deterministic Euler ODE of SD3's pipeline with no classifier-free guidance: the
scheduler's own σ grid after ``set_timesteps`` (shift included), x ← x + (σ_{i+1} − σ_i)·v(x, σ_i·1000).
Images are detected by the exact ``ShapesDetector`` and judged by the GenEval rule engine of
``services.geneval`` — the rules the GenEval reward service applies, with this world's detector. The metric
is the original GenEval correctness per image, averaged per tag; "overall" is the mean of the six tag means,
as GenEval reports it.

Prompts: the test split of ``split_prompts`` (the split seed the model was pretrained with, from its
manifest). Each prompt gets ``images_per_prompt`` images (GenEval: 4), and prompts of tags with few test
prompts get more so that every tag has at least ``min_images_per_tag`` images. The command is
``python -m shapes.evaluate`` (:mod:`shapes.evaluate`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from services.geneval.metadata import parse_metadata
from services.geneval.prompts import images_per_record
from services.geneval.rules import Detection, GenEvalResult
from services.geneval.rules import evaluate as geneval_evaluate
from shapes.detector import Detections, ShapesDetector
from shapes.model import MANIFEST, ShapesModel, read_manifest, to_uint8
from shapes.prompts import Metadata, PromptSplitConfig, split_prompts
from shapes.vocab import CLASSES, TAGS

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights"


@dataclass(kw_only=True)
class EvalConfig:
    """How the prior is measured. Defaults are the recorded evaluation's."""

    num_steps: int = 40
    """Euler steps (E2PO Table 3: 40 inference steps)."""
    shift: float | None = None
    """Timestep shift of the σ grid; None = the one the prior was trained with (its scheduler config)."""
    images_per_prompt: int = 4
    """Images per test prompt (GenEval: 4)."""
    min_images_per_tag: int = 64
    """Tags with few test prompts (single_object has 1) get more images per prompt until the tag has this
    many, so every tag mean rests on enough samples."""
    seed: int = 0
    """Seeds the initial noise; image k of the evaluation always starts from the same noise."""
    batch_size: int = 128
    """Images per transformer call (memory only; the noise does not depend on it)."""
    num_threads: int = 2
    """torch intra-op threads."""


@dataclass(kw_only=True)
class EvalResult:
    """GenEval-shapes of one model."""

    per_tag: dict[str, float]
    """Tag → fraction of images judged correct (original GenEval metric)."""
    overall: float
    """Mean of the six tag means."""
    strict_per_tag: dict[str, float]
    """Tag → fraction of images whose every include clause matched exactly (the rules' ``strict``)."""
    reward_per_tag: dict[str, float]
    """Tag → mean partial-credit reward (the RL training reward)."""
    num_images: dict[str, int]
    """Tag → images evaluated."""
    config: EvalConfig
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"{'tag':<14} {'images':>6} {'geneval':>8} {'strict':>7} {'reward':>7}"]
        for tag in self.per_tag:
            lines.append(
                f"{tag:<14} {self.num_images[tag]:>6} {self.per_tag[tag]:>8.3f} "
                f"{self.strict_per_tag[tag]:>7.3f} {self.reward_per_tag[tag]:>7.3f}"
            )
        lines.append(f"{'overall':<14} {sum(self.num_images.values()):>6} {self.overall:>8.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 1)
        return out


@torch.no_grad()
def sample_euler(
    transformer: SD3Transformer2DModel,
    scheduler: FlowMatchEulerDiscreteScheduler,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    num_steps: int,
) -> torch.Tensor:
    """Deterministic flow ODE from σ = 1 to 0: (B, C, H, W) noise → x0, no guidance.

    diffusers' own loop, as ``StableDiffusion3Pipeline`` runs it: ``set_timesteps`` (the shifted grid,
    final σ = 0), the transformer at each of ``scheduler.timesteps`` (σ·1000), ``scheduler.step``; the
    sample is kept in float32. The trainer's Euler rollout takes the same steps bit for bit
    (``trainer.sampler``, tested against the pipeline).
    """
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise.float()
    for t in scheduler.timesteps:
        v = transformer(
            hidden_states=x.to(transformer.dtype),
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            timestep=t.expand(x.shape[0]),
        ).sample.float()
        x = scheduler.step(v, t, x).prev_sample
    return x


def to_rule_detections(found: Detections) -> dict[str, list[Detection]]:
    """The shapes detector's output in the rule engine's type."""
    return {
        cls: [Detection(box=d.box, score=d.score, mask=d.mask, color=d.color) for d in dets]
        for cls, dets in found.items()
    }


def heldout_records(split_seed: int) -> list[Metadata]:
    return split_prompts(PromptSplitConfig(), split_seed)[1]


def expand_records(records: Sequence[Metadata], config: EvalConfig) -> list[Metadata]:
    """One entry per image: each record repeated, prompts of small tags more often (see ``EvalConfig``)."""
    counts = images_per_record(records, config.images_per_prompt, config.min_images_per_tag)
    return [record for record, n in zip(records, counts, strict=True) for _ in range(n)]


def generate(model: ShapesModel, prompts: Sequence[str], config: EvalConfig) -> np.ndarray:
    """(N, H, W, 3) uint8 images of ``prompts``; image k starts from the k-th draw of the seeded noise."""
    size = model.image_size
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(len(prompts), 3, size, size, generator=generator)
    images = []
    with torch.no_grad():
        for start in range(0, len(prompts), config.batch_size):
            chunk = list(prompts[start : start + config.batch_size])
            prompt_embeds, pooled = model.encode_prompt(chunk)
            x0 = sample_euler(
                model.transformer,
                model.scheduler,
                noise[start : start + len(chunk)],
                prompt_embeds,
                pooled,
                config.num_steps,
            )
            images.append(to_uint8(x0))
    return np.concatenate(images)


def geneval_results(images: np.ndarray, records: Sequence[Metadata]) -> list[GenEvalResult]:
    """GenEval-shapes of each image (N, H, W, 3) against its record: the exact detector, then the rules."""
    detections = ShapesDetector().detect_batch(images)
    return [
        geneval_evaluate(parse_metadata(r, known_classes=CLASSES), to_rule_detections(d))
        for r, d in zip(records, detections, strict=True)
    ]


def summarize(
    results: Sequence[GenEvalResult], records: Sequence[Metadata], config: EvalConfig, *, seconds: float = 0.0
) -> EvalResult:
    """Per-tag means of per-image results (GenEval's overall is the mean over tags)."""
    tags = [tag for tag in TAGS if any(r["tag"] == tag for r in records)]

    def mean_of(field: str, tag: str) -> float:
        return float(np.mean([getattr(res, field) for res in results if res.tag == tag]))

    per_tag = {tag: mean_of("correct", tag) for tag in tags}
    return EvalResult(
        per_tag=per_tag,
        overall=float(np.mean(list(per_tag.values()))),
        strict_per_tag={tag: mean_of("strict", tag) for tag in tags},
        reward_per_tag={tag: mean_of("score", tag) for tag in tags},
        num_images={tag: sum(res.tag == tag for res in results) for tag in tags},
        config=config,
        seconds=seconds,
    )


def score_images(
    images: np.ndarray, records: Sequence[Metadata], config: EvalConfig, *, seconds: float = 0.0
) -> tuple[EvalResult, list[bool]]:
    """GenEval-shapes of ``images`` (N, H, W, 3) against their ``records``; also the per-image verdicts."""
    results = geneval_results(images, records)
    return summarize(results, records, config, seconds=seconds), [res.correct for res in results]


def evaluate_model(
    model: ShapesModel, records: Sequence[Metadata], config: EvalConfig
) -> tuple[EvalResult, np.ndarray, list[Metadata], list[bool]]:
    """Sample, detect and score; returns (result, images, the record of each image, each image's verdict)."""
    started = time.monotonic()
    expanded = expand_records(records, config)
    images = generate(model, [r["prompt"] for r in expanded], config)
    result, correct = score_images(images, expanded, config, seconds=time.monotonic() - started)
    return result, images, expanded, correct


def record_in_manifest(model_dir: Path, result: EvalResult) -> None:
    manifest = read_manifest(model_dir)
    if manifest is None:
        raise ValueError(f"{model_dir} has no {MANIFEST} to record the result in.")
    manifest["prior_eval"] = result.to_dict()
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
