"""A sample grid a person can read a GenEval run from: one row per tag, several prompts per row, several
images (seeds) per prompt, the prompt written under its images, each image framed green (correct), red
(wrong) or grey (not judged). ``trainer.evaluate``, ``shapes.evaluate`` and TensorBoard show this grid.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from services.geneval.metadata import TAGS

CORRECT, WRONG, UNJUDGED = (0, 160, 0), (200, 0, 0), (170, 170, 170)


@dataclass(frozen=True, kw_only=True)
class GridLayout:
    """How many prompts a row shows, how many images of each, and how large."""

    prompts_per_row: int = 4
    images_per_prompt: int = 2
    scale: int = 4
    """Nearest-neighbour upscaling of each image (32² shapes images are tiny)."""
    pad: int = 3
    caption_lines: int = 3
    line_height: int = 11
    label_width: int = 90
    """Left margin holding each row's tag."""

    def box(self, image_side: int) -> int:
        """Side of one framed image."""
        return image_side * self.scale + 2 * self.pad

    def row_height(self, image_side: int) -> int:
        return self.box(image_side) + self.caption_lines * self.line_height + self.pad

    def origin(self, image_side: int, row: int, prompt: int, image: int) -> tuple[int, int]:
        """Top-left pixel of one image's frame."""
        box = self.box(image_side)
        left = self.label_width + prompt * (self.images_per_prompt * box + self.pad) + image * box
        return left, row * self.row_height(image_side)


def rows_by_tag(
    records: Sequence[Mapping[str, Any]], layout: GridLayout
) -> list[tuple[str, list[tuple[str, list[int]]]]]:
    """(tag, [(prompt, image indices)]) per row: GenEval's tags in their order, then any other; within a
    tag the first ``prompts_per_row`` distinct prompts, each with its first ``images_per_prompt`` images."""
    by_tag: dict[str, dict[str, list[int]]] = {}
    for index, record in enumerate(records):
        prompts = by_tag.setdefault(str(record.get("tag", "")), {})
        prompts.setdefault(str(record["prompt"]), []).append(index)
    order = [t for t in TAGS if t in by_tag] + sorted(t for t in by_tag if t not in TAGS)
    return [
        (
            tag,
            [
                (prompt, indices[: layout.images_per_prompt])
                for prompt, indices in list(by_tag[tag].items())[: layout.prompts_per_row]
            ],
        )
        for tag in order
    ]


def tag_grid(
    images: np.ndarray,
    records: Sequence[Mapping[str, Any]],
    correct: Sequence[bool] | None = None,
    layout: GridLayout = GridLayout(),
) -> Image.Image:
    """``images`` (N, H, W, 3) uint8, ``records[i]`` the GenEval record image i was sampled for (its
    ``prompt`` and ``tag``), ``correct[i]`` its GenEval correctness when judged."""
    if len(images) != len(records) or (correct is not None and len(correct) != len(images)):
        raise ValueError(f"{len(images)} images, {len(records)} records, {len(correct or ())} judgements")
    image_side = images.shape[1]
    side, box, row_height = image_side * layout.scale, layout.box(image_side), layout.row_height(image_side)
    group_width = layout.images_per_prompt * box
    rows = rows_by_tag(records, layout)
    width = layout.label_width + layout.prompts_per_row * (group_width + layout.pad)
    grid = Image.new("RGB", (width, len(rows) * row_height), "white")
    draw = ImageDraw.Draw(grid)
    for row, (tag, prompts) in enumerate(rows):
        top = row * row_height
        draw.text((2, top + box // 2 - 5), tag or "(no tag)", fill="black")
        for column, (prompt, indices) in enumerate(prompts):
            for k, index in enumerate(indices):
                x, y = layout.origin(image_side, row, column, k)
                frame = UNJUDGED if correct is None else (CORRECT if correct[index] else WRONG)
                draw.rectangle([x, y, x + box - 1, y + box - 1], fill=frame)
                tile = Image.fromarray(images[index]).resize((side, side), Image.Resampling.NEAREST)
                grid.paste(tile, (x + layout.pad, y + layout.pad))
            left, _ = layout.origin(image_side, row, column, 0)
            text = prompt.removeprefix("a photo of ")
            width_chars = max(8, group_width // 6)
            for k, line in enumerate(textwrap.wrap(text, width=width_chars)[: layout.caption_lines]):
                draw.text((left + 2, top + box + k * layout.line_height), line, fill="black")
    return grid
