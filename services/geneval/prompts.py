"""GenEval-format prompts over the COCO-80 classes, and a validating reader of metadata JSONL.

Records follow GenEval's prompt generator (``prompts/create_prompts.py`` of djghosh13/geneval):

- six tags; "a photo of " + an article chosen by the next word's first letter ("an orange cow");
- counting: two to four objects in number words with GenEval's plural rule (+"es" after a final "s", else
  +"s"), and an exclude clause at ``count + 1`` so the original metric fails on over-generation;
- colors / color_attr: the ten colour-classifier colours, never on "person"; color_attr uses two different
  classes and two different colours;
- position: "a photo of a <subject> <relation> a <reference>" with the reference as ``include[0]`` and the
  subject as ``include[1]`` carrying ``position: [relation, 0]``.

Upstream writes one suite (every class once for single_object, ~100 draws per other tag, de-duplicated);
here each tag gets ``num`` distinct records (fewer only when the tag has fewer distinct prompts), which
suits training sets of any size.

    python -m services.geneval.prompts --out prompts.jsonl --num 500 --seed 0
    python -m services.geneval.prompts --validate evaluation_metadata.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.geneval.coco import GENEVAL_CLASSES
from services.geneval.metadata import COLORS, RELATIONS, TAGS, parse_metadata

Record = dict[str, Any]

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")


@dataclass(frozen=True, kw_only=True)
class PromptSpace:
    """The vocabulary prompts are drawn from; defaults are GenEval's."""

    classes: tuple[str, ...] = GENEVAL_CLASSES
    """Object classes, GenEval spelling."""
    uncolored_classes: frozenset[str] = frozenset({"person"})
    """Classes never given a colour (GenEval avoids "a purple person")."""
    min_count: int = 2
    """Smallest counting number; one object is the single_object tag's job. GenEval: 2."""
    max_count: int = 4
    """Largest counting number. GenEval: 4."""

    def __post_init__(self) -> None:
        if len(set(self.classes)) < 2:
            raise ValueError(f"classes must hold at least two distinct names, got {self.classes!r}.")
        if len(set(self.classes) - self.uncolored_classes) < 2:
            raise ValueError("at least two classes must be colourable for color_attr prompts.")
        if not 2 <= self.min_count <= self.max_count < len(NUMBER_WORDS):
            raise ValueError(
                f"counts must satisfy 2 <= min_count <= max_count <= {len(NUMBER_WORDS) - 1}, "
                f"got {self.min_count}..{self.max_count}."
            )

    @property
    def colorable(self) -> tuple[str, ...]:
        return tuple(c for c in self.classes if c not in self.uncolored_classes)


def images_per_record(
    records: Sequence[Record], images_per_prompt: int, min_images_per_tag: int
) -> list[int]:
    """Images to generate for each record: ``images_per_prompt`` (GenEval: 4), or more where the record's tag
    has too few prompts to reach ``min_images_per_tag`` images (the same count for every prompt of a tag),
    so that no tag mean rests on a handful of images."""
    prompts_per_tag = Counter(str(r.get("tag", "")) for r in records)
    return [
        max(images_per_prompt, math.ceil(min_images_per_tag / prompts_per_tag[str(r.get("tag", ""))]))
        for r in records
    ]


def with_article(phrase: str) -> str:
    """GenEval's article rule: "an" before a vowel letter, else "a"."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def plural(name: str) -> str:
    """GenEval's plural rule, kept as is so prompts match upstream's ("two buses", "two sheeps")."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def single_object(cls: str) -> Record:
    return {
        "tag": "single_object",
        "include": [{"class": cls, "count": 1}],
        "prompt": f"a photo of {with_article(cls)}",
    }


def two_object(first: str, second: str) -> Record:
    return {
        "tag": "two_object",
        "include": [{"class": first, "count": 1}, {"class": second, "count": 1}],
        "prompt": f"a photo of {with_article(first)} and {with_article(second)}",
    }


def counting(cls: str, count: int) -> Record:
    return {
        "tag": "counting",
        "include": [{"class": cls, "count": count}],
        "exclude": [{"class": cls, "count": count + 1}],
        "prompt": f"a photo of {NUMBER_WORDS[count]} {plural(cls)}",
    }


def colors(cls: str, color: str) -> Record:
    return {
        "tag": "colors",
        "include": [{"class": cls, "count": 1, "color": color}],
        "prompt": f"a photo of {with_article(color)} {cls}",
    }


def position(subject: str, relation: str, reference: str) -> Record:
    return {
        "tag": "position",
        "include": [
            {"class": reference, "count": 1},
            {"class": subject, "count": 1, "position": [relation, 0]},
        ],
        "prompt": f"a photo of {with_article(subject)} {relation} {with_article(reference)}",
    }


def color_attr(first: str, first_color: str, second: str, second_color: str) -> Record:
    return {
        "tag": "color_attr",
        "include": [
            {"class": first, "count": 1, "color": first_color},
            {"class": second, "count": 1, "color": second_color},
        ],
        "prompt": f"a photo of {with_article(first_color)} {first} and {with_article(second_color)} {second}",
    }


def _pick(rng: np.random.Generator, items: Sequence[str], k: int) -> list[str]:
    return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


def _sample_single_object(rng: np.random.Generator, space: PromptSpace) -> Record:
    return single_object(*_pick(rng, space.classes, 1))


def _sample_two_object(rng: np.random.Generator, space: PromptSpace) -> Record:
    return two_object(*_pick(rng, space.classes, 2))


def _sample_counting(rng: np.random.Generator, space: PromptSpace) -> Record:
    (cls,) = _pick(rng, space.classes, 1)
    return counting(cls, int(rng.integers(space.min_count, space.max_count, endpoint=True)))


def _sample_colors(rng: np.random.Generator, space: PromptSpace) -> Record:
    return colors(*_pick(rng, space.colorable, 1), *_pick(rng, COLORS, 1))


def _sample_position(rng: np.random.Generator, space: PromptSpace) -> Record:
    subject, reference = _pick(rng, space.classes, 2)
    return position(subject, *_pick(rng, RELATIONS, 1), reference)


def _sample_color_attr(rng: np.random.Generator, space: PromptSpace) -> Record:
    (first, second), (first_color, second_color) = _pick(rng, space.colorable, 2), _pick(rng, COLORS, 2)
    return color_attr(first, first_color, second, second_color)


_SAMPLERS: dict[str, Callable[[np.random.Generator, PromptSpace], Record]] = {
    "single_object": _sample_single_object,
    "two_object": _sample_two_object,
    "counting": _sample_counting,
    "colors": _sample_colors,
    "position": _sample_position,
    "color_attr": _sample_color_attr,
}


def num_distinct(tag: str, space: PromptSpace) -> int:
    """How many different records ``tag`` has over ``space``."""
    n, m, c, r = len(space.classes), len(space.colorable), len(COLORS), len(RELATIONS)
    sizes = {
        "single_object": n,
        "two_object": n * (n - 1),
        "counting": n * (space.max_count - space.min_count + 1),
        "colors": m * c,
        "position": n * (n - 1) * r,
        "color_attr": m * (m - 1) * c * (c - 1),
    }
    return sizes[tag]


def generate(
    num_per_tag: int, seed: int, *, space: PromptSpace | None = None, tags: Sequence[str] = TAGS
) -> list[Record]:
    """``num_per_tag`` distinct records per tag (all of a tag's records when it has fewer), tags in order.

    Deterministic in ``seed``. Draws are uniform over each tag's arguments and repeats are redrawn, so the
    records of a tag are a uniform sample without replacement of its prompt space.
    """
    if num_per_tag < 1:
        raise ValueError(f"num_per_tag must be >= 1, got {num_per_tag}.")
    unknown = [t for t in tags if t not in TAGS]
    if unknown:
        raise ValueError(f"tags must be among {list(TAGS)}, got {unknown}.")
    space = space or PromptSpace()
    rng = np.random.default_rng(seed)
    records: list[Record] = []
    for tag in tags:
        target = min(num_per_tag, num_distinct(tag, space))
        seen: set[str] = set()
        # Drawing all of a space of size S takes about S·ln(S) draws (coupon collector); allow 20× that.
        budget = 20 * max(target, 1) * max(1, math.ceil(math.log(target + 1)))
        while len(seen) < target:
            if budget == 0:
                raise RuntimeError(f"could not draw {target} distinct {tag} records")
            budget -= 1
            record = _SAMPLERS[tag](rng, space)
            key = json.dumps(record, sort_keys=True)
            if key not in seen:
                seen.add(key)
                records.append(record)
    return records


def read_metadata_jsonl(path: str | Path, *, known_classes: Collection[str] | None = None) -> list[Record]:
    """Every record of a GenEval metadata JSONL file (upstream's ``evaluation_metadata.jsonl`` as is).

    Each line is validated with :func:`parse_metadata`; a bad line raises ``ValueError`` with its line
    number. Blank lines are skipped. The records are returned as parsed JSON, ready to send as metadata.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                parse_metadata(record, known_classes=known_classes)
            except (json.JSONDecodeError, ValueError) as err:
                raise ValueError(f"{path}:{number}: {err}") from None
            records.append(record)
    return records


def write_jsonl(path: str | Path, records: Sequence[Record]) -> None:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.geneval.prompts",
        description="Write GenEval-format COCO prompts, or validate a GenEval metadata JSONL file.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", type=Path, help="JSONL file to write")
    action.add_argument("--validate", type=Path, help="JSONL file to check line by line")
    parser.add_argument("--num", type=int, default=100, help="distinct records per tag (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--any-class", action="store_true", help="with --validate: accept non-COCO classes")
    args = parser.parse_args(argv)
    try:
        if args.validate is not None:
            known = None if args.any_class else GENEVAL_CLASSES
            records = read_metadata_jsonl(args.validate, known_classes=known)
        else:
            records = generate(args.num, args.seed)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(args.out, records)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    per_tag = {tag: sum(r["tag"] == tag for r in records) for tag in TAGS}
    print(f"{args.out or args.validate}: {len(records)} records {per_tag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
