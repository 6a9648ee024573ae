"""GenEval-format prompts for the shapes world: the full prompt space of its vocabulary, train/test splits.

Each record comes from the GenEval format package's builder for its tag (``services.geneval.prompts``),
so wording follows GenEval's prompt generator: "a photo of " + an article chosen by the first letter
("an orange circle"), number words for counts, plural class names, and for position "a photo of a
<subject> <relation> a <reference>" where the reference is include[0] and the subject include[1] with
``position: [relation, 0]``.

    python -m shapes.prompts --out-dir DIR --seed S   # writes DIR/train.jsonl and DIR/test.jsonl
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.geneval.prompts import color_attr, colors, counting, position, single_object, two_object
from shapes.vocab import CLASSES, COLOR_NAMES, COUNTING_COUNTS, RELATIONS, TAGS

Metadata = dict[str, Any]


def _distinct_pairs(items: Sequence[str]) -> list[tuple[str, str]]:
    return list(itertools.permutations(items, 2))


@functools.cache
def _arguments(tag: str) -> tuple[tuple[Any, ...], ...]:
    """Every argument tuple of the tag's builder: the tag's full combinatorial space, in a fixed order.

    Two-object tags use two different classes (same-class objects would count for each other) and color_attr
    two different colours (the tag is about binding each colour to its object).
    """
    spaces: dict[str, Iterable[tuple[Any, ...]]] = {
        "single_object": ((c,) for c in CLASSES),
        "two_object": _distinct_pairs(CLASSES),
        "counting": itertools.product(CLASSES, COUNTING_COUNTS),
        "colors": itertools.product(CLASSES, COLOR_NAMES),
        "position": ((a, r, b) for (a, b) in _distinct_pairs(CLASSES) for r in RELATIONS),
        "color_attr": (
            (a, ca, b, cb) for (a, b) in _distinct_pairs(CLASSES) for (ca, cb) in _distinct_pairs(COLOR_NAMES)
        ),
    }
    if tag not in spaces:
        raise ValueError(f"tag must be one of {list(TAGS)}, got {tag!r}.")
    return tuple(spaces[tag])


BUILDERS: dict[str, Callable[..., Metadata]] = {
    "single_object": single_object,
    "two_object": two_object,
    "counting": counting,
    "colors": colors,
    "position": position,
    "color_attr": color_attr,
}


def all_metadata(tag: str) -> list[Metadata]:
    """Every distinct record of ``tag`` (fresh dicts), in a fixed order."""
    return [BUILDERS[tag](*args) for args in _arguments(tag)]


def sample_metadata(tag: str, rng: np.random.Generator) -> Metadata:
    """A uniformly drawn record of ``tag`` (a fresh dict the caller may modify)."""
    space = _arguments(tag)
    return BUILDERS[tag](*space[rng.integers(len(space))])


@dataclass(kw_only=True)
class PromptSplitConfig:
    """Sizes of the train/test prompt files."""

    num_test_per_tag: int = 100
    """Test prompts per tag (GenEval has 80–100 per tag), capped by ``max_test_fraction``."""
    max_test_fraction: float = 0.25
    """At most this fraction of a tag's distinct prompts goes to test (at least one per tag), so small tags
    such as single_object (4 prompts) keep most of their prompts for training."""
    num_train_per_tag: int | None = None
    """None: train holds every remaining prompt once (the full space, dominated by color_attr). An integer:
    that many lines per tag, drawn without replacement and cycling through the tag's train prompts again once
    they are used up, so uniform sampling of lines weights the tags equally."""

    def __post_init__(self) -> None:
        if self.num_test_per_tag < 1:
            raise ValueError(f"num_test_per_tag must be >= 1, got {self.num_test_per_tag}.")
        if not 0.0 < self.max_test_fraction < 1.0:
            raise ValueError(f"max_test_fraction must be in (0, 1), got {self.max_test_fraction}.")
        if self.num_train_per_tag is not None and self.num_train_per_tag < 1:
            raise ValueError(f"num_train_per_tag must be None or >= 1, got {self.num_train_per_tag}.")


def split_prompts(config: PromptSplitConfig, seed: int) -> tuple[list[Metadata], list[Metadata]]:
    """(train, test) records, deterministic in ``seed``; no test prompt string occurs in train.

    Splitting is by distinct prompt per tag, so every tag appears in both splits. The test split depends on
    the seed and the test sizes only, so changing ``num_train_per_tag`` never moves a prompt between splits.
    """
    split_rng, train_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    train: list[Metadata] = []
    test: list[Metadata] = []
    for tag in TAGS:
        records = all_metadata(tag)
        order = split_rng.permutation(len(records))
        num_test = max(1, min(config.num_test_per_tag, math.floor(config.max_test_fraction * len(records))))
        test.extend(records[i] for i in order[:num_test])
        rest = [records[i] for i in order[num_test:]]
        if config.num_train_per_tag is None:
            train.extend(rest)
        else:
            cycles = math.ceil(config.num_train_per_tag / len(rest))
            picks = np.concatenate([train_rng.permutation(len(rest)) for _ in range(cycles)])[
                : config.num_train_per_tag
            ]
            train.extend(json.loads(json.dumps(rest[i])) for i in picks)
    return train, test


def write_jsonl(path: Path, records: Iterable[Metadata]) -> int:
    """Write one JSON record per line; returns the number of lines."""
    lines = [json.dumps(r) + "\n" for r in records]
    path.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, required=True)
    defaults = PromptSplitConfig()
    parser.add_argument("--num-test-per-tag", type=int, default=defaults.num_test_per_tag)
    parser.add_argument("--max-test-fraction", type=float, default=defaults.max_test_fraction)
    parser.add_argument("--num-train-per-tag", type=int, default=defaults.num_train_per_tag)
    args = parser.parse_args(argv)
    config = PromptSplitConfig(
        num_test_per_tag=args.num_test_per_tag,
        max_test_fraction=args.max_test_fraction,
        num_train_per_tag=args.num_train_per_tag,
    )
    train, test = split_prompts(config, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("test", test)):
        path = args.out_dir / f"{name}.jsonl"
        per_tag = {tag: sum(r["tag"] == tag for r in records) for tag in TAGS}
        print(f"{path}: {write_jsonl(path, records)} prompts {per_tag}")


if __name__ == "__main__":
    main()
