"""Render GenEval metadata to a shapes-world image.

    python -m shapes.render --metadata '{"tag": "colors", ...}' --seed 0 --out img.png

``--metadata`` takes the JSON record itself or a path to a .json/.jsonl file (its first record is used).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shapes.prompts import Metadata, sample_metadata
from shapes.raster import draw_scene
from shapes.scene import SceneConfig, plan_scene

_DEFAULT_CONFIG = SceneConfig()


def render(
    metadata: Mapping[str, Any], rng: np.random.Generator, config: SceneConfig | None = None
) -> np.ndarray:
    """An image (H, W, 3) uint8 that satisfies ``metadata`` under GenEval's rules; deterministic in ``rng``'s
    state.

    Raises ``ValueError`` when the record names something outside the shapes vocabulary.
    """
    config = config or _DEFAULT_CONFIG
    return draw_scene(plan_scene(metadata, rng, config), image_size=config.image_size)


def sample_scene(
    tag: str, rng: np.random.Generator, config: SceneConfig | None = None
) -> tuple[Metadata, np.ndarray]:
    """A uniformly drawn record of ``tag`` and an image of it."""
    metadata = sample_metadata(tag, rng)
    return metadata, render(metadata, rng, config)


def _load_metadata(text: str) -> Metadata:
    if text.lstrip().startswith("{"):
        return json.loads(text)
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"--metadata must be a JSON object or an existing file, got {text!r}.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--metadata file {text} holds no record.")
    return json.loads(lines[0])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--metadata", required=True, help="JSON record, or a .json/.jsonl file path")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output image path (e.g. .png)")
    parser.add_argument("--image-size", type=int, default=_DEFAULT_CONFIG.image_size)
    args = parser.parse_args(argv)
    image = render(
        _load_metadata(args.metadata),
        np.random.default_rng(args.seed),
        SceneConfig(image_size=args.image_size),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(args.out)


if __name__ == "__main__":
    main()
