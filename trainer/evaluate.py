"""Evaluate a run: ``python -m trainer.evaluate --run DIR [--steps 40] [--samples-per-prompt 4]``.

Samples the held-out prompts with the EMA policy by a deterministic 40-step ODE (no CFG), scores them
with every reward of the run (started locally unless endpoints are given), reports the GenEval
correctness per tag and its six-tag mean when a GenEval reward is present, and writes
``eval/results.json``, ``eval/table.md`` and a sample grid ``eval/grid.png``.

Each prompt gets ``--samples-per-prompt`` images (GenEval: 4); prompts of tags with few held-out prompts
get more, so that every tag has at least ``--min-images-per-tag`` images (a tag with one prompt would
otherwise be judged on four images). With two or more images per prompt the diversity of each prompt's
samples is reported too: pixel distance always, layout diversity from the exact detector in the shapes
world.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.geneval.grid import tag_grid
from services.geneval.metadata import TAGS
from services.geneval.prompts import images_per_record
from trainer import checkpoint as ckpt
from trainer import children
from trainer.config import TrainConfig
from trainer.diversity import layout_diversity, pixel_diversity
from trainer.model import (
    POLICY,
    FlowModel,
    load_adapter_state,
    load_model,
    merge_adapter,
    pick_device,
    use_adapter,
)
from trainer.policy import EMA
from trainer.prompts import Record, load_records, reward_metadata
from trainer.rewards import RewardSet, RewardSpec, RewardUnavailable
from trainer.rollout import RolloutConfig, denoise, inference_sigmas

TAG_INDICATOR = "geneval/tag/"
"""Prefix of the GenEval service's one-hot tag outputs (grouping indicators, not scores)."""


@torch.no_grad()
def generate(
    model: FlowModel,
    records: list[Record],
    *,
    steps: int,
    sampler: str,
    seed: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """uint8 images (N, 3, H, W) from the active adapter, one per record, from noise seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    expanded = list(records)
    noise = torch.randn((len(expanded), *model.sample_shape), generator=generator)
    sigmas = inference_sigmas(model, steps)
    config = RolloutConfig(num_steps=steps, sampler=sampler)
    device = model.transformer.device
    images = []
    for start in range(0, len(expanded), batch_size):
        chunk = expanded[start : start + batch_size]
        cond = model.text.encode([r["prompt"] for r in chunk])
        unperturbed = torch.zeros(len(chunk), dtype=torch.bool)
        x0 = denoise(
            model, noise[start : start + len(chunk)].to(device), cond, cond, unperturbed, sigmas, config
        )
        images.append((model.decode(x0) * 255).round().to(torch.uint8).cpu())
    return torch.cat(images)


def diversity(images: torch.Tensor, counts: list[int], *, layouts: bool) -> dict[str, float]:
    """Mean per-prompt pixel diversity over ``images`` grouped by ``counts`` (record-major), and layout
    diversity from the exact shapes detector if asked."""
    groups = images.split(counts)
    out = {"diversity/pixel_rms": float(np.mean([pixel_diversity(g) for g in groups]))}
    if layouts:
        from shapes.detector import ShapesDetector

        detector = ShapesDetector()
        scores = []
        for group in groups:
            found = [detector.detect(img.permute(1, 2, 0).numpy()) for img in group]
            boxes = [[d.box for dets in f.values() for d in dets] for f in found]
            scores.append(layout_diversity(boxes))
        out["diversity/layout"] = float(np.mean(scores))
    return out


def summarise(records: list[Record], outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Mean of every score; GenEval correctness per tag, the images behind each, and the mean over tags.

    The GenEval service's ``geneval/tag/<tag>`` outputs are one-hot indicators for grouping, not scores:
    their mean is only the share of images with that tag, so they are left out of the means.
    """
    summary: dict[str, Any] = {
        name: float(np.mean(values)) for name, values in outputs.items() if not name.startswith(TAG_INDICATOR)
    }
    correct = outputs.get("geneval/correct")
    if correct is not None:
        per_tag: dict[str, list[float]] = defaultdict(list)
        for record, value in zip(records, correct, strict=True):
            per_tag[str(record.get("tag", "unknown"))].append(float(value))
        ordered = sorted(per_tag.items())
        tags = {tag: float(np.mean(v)) for tag, v in ordered}
        summary["geneval/per_tag"] = tags
        summary["geneval/images_per_tag"] = {tag: len(v) for tag, v in ordered}
        present = [tags[t] for t in TAGS if t in tags]
        summary["geneval/overall"] = float(np.mean(present)) if present else math.nan
    return summary


def write_grid(
    images: torch.Tensor, records: list[Record], outputs: dict[str, np.ndarray], path: Path
) -> None:
    """The per-tag sample grid (``services.geneval.grid``), framed by GenEval correctness when scored."""
    correct = outputs.get("geneval/correct")
    judged = None if correct is None else [bool(v) for v in correct]
    path.parent.mkdir(parents=True, exist_ok=True)
    tag_grid(images.permute(0, 2, 3, 1).numpy(), records, judged).save(path)


def markdown_table(summary: dict[str, Any]) -> str:
    def cell(value: Any, digits: int) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| metric | value |", "| --- | --- |"]
    for key, value in summary.items():
        if isinstance(value, dict):
            lines += [f"| {key}/{tag} | {cell(v, 3)} |" for tag, v in value.items()]
        else:
            lines.append(f"| {key} | {cell(value, 4)} |")
    return "\n".join(lines) + "\n"


async def evaluate_model(
    model: FlowModel,
    cfg: TrainConfig,
    records: list[Record],
    *,
    steps: int,
    seed: int,
    samples_per_prompt: int = 1,
    min_images_per_tag: int = 0,
) -> tuple[dict[str, Any], torch.Tensor, list[Record], dict[str, np.ndarray]]:
    """Sample, score and summarise ``records`` with the model's active adapter.

    Returns the summary, the uint8 images, the record of each image (record-major) and each image's
    outputs by name."""
    counts = images_per_record(records, samples_per_prompt, min_images_per_tag)
    expanded = [r for r, n in zip(records, counts, strict=True) for _ in range(n)]
    images = generate(model, expanded, steps=steps, sampler=cfg.rollout.sampler, seed=seed)
    rewards = RewardSet(cfg.reward)
    try:
        await rewards.connect()
        rewards.submit(
            torch.arange(len(expanded)),
            images,
            [r["prompt"] for r in expanded],
            [reward_metadata(r) for r in expanded],
        )
        chunks = await rewards.collect()
    finally:
        await rewards.close()
    outputs: dict[str, list[np.ndarray]] = defaultdict(list)
    for chunk in sorted(chunks, key=lambda c: int(c.indices[0])):
        for name, values in chunk.outputs.items():
            outputs[name].append(np.asarray(values))
    per_image = {name: np.concatenate(v) for name, v in outputs.items()}
    summary = summarise(expanded, per_image)
    if min(counts) >= 2:
        summary.update(diversity(images, counts, layouts=cfg.model.path == "shapes"))
    summary["images"] = len(expanded)
    return summary, images, expanded, per_image


async def evaluate(
    cfg: TrainConfig,
    run_dir: Path | None,
    *,
    steps: int,
    num_prompts: int | None,
    seed: int,
    use_ema: bool,
    samples_per_prompt: int = 1,
    min_images_per_tag: int = 0,
    out: Path | None = None,
) -> dict[str, Any]:
    """Evaluate the run's EMA (or θ) weights, or the base model without ``run_dir``; write ``out``."""
    model = load_model(cfg.model, pick_device(cfg.run.device))
    if run_dir is not None:
        path = ckpt.resolve(run_dir)
        from safetensors.torch import load_file

        tensors = load_file(path / "adapters.safetensors")
        prefix = f"{EMA if use_ema else POLICY}/"
        load_adapter_state(
            model.transformer,
            POLICY,
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
        )
    use_adapter(model.transformer, POLICY)
    merge_adapter(model.transformer, POLICY)
    records = load_records(cfg.data.test, "test")[:num_prompts]
    summary, images, expanded, per_image = await evaluate_model(
        model,
        cfg,
        records,
        steps=steps,
        seed=seed,
        samples_per_prompt=samples_per_prompt,
        min_images_per_tag=min_images_per_tag,
    )
    out = out or (run_dir or Path(cfg.run.out)) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(summary))
    write_grid(images, expanded, per_image, out / "grid.png")
    if run_dir is not None:
        log_to_tensorboard(run_dir, ckpt.resolve(run_dir), summary, out / "grid.png")
    return summary


def log_to_tensorboard(run_dir: Path, checkpoint: Path, summary: dict[str, Any], grid: Path) -> None:
    """The evaluation's scores and grid in the run's TensorBoard, at the checkpoint's iteration."""
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    iteration = int(json.loads((checkpoint / "state.json").read_text())["iteration"])
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for key, value in summary.items():
            if isinstance(value, dict):
                for tag, v in value.items():
                    writer.add_scalar(f"eval/{key}/{tag}", float(v), iteration)
            elif isinstance(value, float) and math.isfinite(value):
                writer.add_scalar(f"eval/{key}", value, iteration)
        writer.add_image(
            "eval/grid", np.asarray(Image.open(grid).convert("RGB")), iteration, dataformats="HWC"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="run directory (omit to evaluate the base model of --preset)")
    p.add_argument("--preset", default="shapes")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--num-prompts", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="evaluate θ instead of its EMA")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="> 1 also reports per-prompt diversity")
    p.add_argument(
        "--min-images-per-tag",
        type=int,
        default=64,
        help="prompts of sparse tags get more images until each tag has this many (0: off)",
    )
    p.add_argument("--out", type=Path, help="output directory (default RUN/eval)")
    p.add_argument("--reward-endpoint", action="append", default=[])
    p.add_argument(
        "--connect-timeout-s",
        type=float,
        default=10.0,
        help="give up on an unreachable reward service after this",
    )
    args = p.parse_args(argv)
    if args.run is not None:
        try:
            cfg = TrainConfig.load(args.run / "config.json")
        except ValueError as exc:
            p.error(str(exc))
    else:
        from trainer.config import build_config

        cfg = build_config(args.preset)
    if args.reward_endpoint:
        cfg.reward.rewards = [RewardSpec.parse(e) for e in args.reward_endpoint]
    cfg.reward.connect_timeout_s = args.connect_timeout_s
    children.stop_on_sigterm()
    try:
        summary = asyncio.run(
            evaluate(
                cfg,
                args.run,
                steps=args.steps,
                num_prompts=args.num_prompts,
                seed=args.seed,
                use_ema=not args.no_ema,
                samples_per_prompt=args.samples_per_prompt,
                min_images_per_tag=args.min_images_per_tag,
                out=args.out,
            )
        )
    except KeyboardInterrupt:
        print("stopped before the evaluation finished; nothing was written", file=sys.stderr)
        return children.STOPPED_EXIT_CODE
    except RewardUnavailable as exc:
        print(f"error: {exc} (--reward-endpoint NAME=HOST:PORT scores with another server)", file=sys.stderr)
        return 1
    print(markdown_table(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
