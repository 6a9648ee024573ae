"""GenEval prompt metadata: parsing and validation into frozen dataclasses.

A metadata record describes what a prompt asks for (``include`` clauses), what it must not contain
(``exclude`` clauses, used by counting prompts) and which of the six GenEval tags it belongs to. The format
is the one of ``../shared/data/geneval_metadata_format_sample.jsonl``. Bad records raise ``ValueError``
here, once, so the rule engine never has to guess what a malformed clause meant.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from services.core.quote import quote

Tag = Literal["single_object", "two_object", "counting", "colors", "position", "color_attr"]
Relation = Literal["left of", "right of", "above", "below"]
Color = Literal["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]

TAGS: tuple[str, ...] = get_args(Tag)
RELATIONS: tuple[str, ...] = get_args(Relation)
# The ten colour names of the GenEval colour classifier, in its prompt order.
COLORS: tuple[str, ...] = get_args(Color)

_TOP_LEVEL_KEYS = frozenset({"tag", "include", "exclude", "prompt"})
_INCLUDE_KEYS = frozenset({"class", "count", "color", "position"})
_EXCLUDE_KEYS = frozenset({"class", "count"})


@dataclass(frozen=True, kw_only=True)
class Clause:
    """One requirement on the objects of a class."""

    cls: str
    """Detector class name, e.g. ``"tv remote"``."""
    count: int
    """Include: how many objects of ``cls`` the image should hold. Exclude: the count at which it fails."""
    color: str | None = None
    """One of ``COLORS`` that every counted object must have, or None. Always None for exclude clauses."""
    position: tuple[str, int] | None = None
    """``(relation, index)``: every object must be ``relation`` every object of the earlier include clause
    ``index``. Always None for exclude clauses."""


@dataclass(frozen=True, kw_only=True)
class Metadata:
    """A validated GenEval record."""

    tag: str
    """One of ``TAGS``; selects the detection threshold and the bucket of the GenEval mean."""
    include: tuple[Clause, ...]
    """Required objects, in order; position clauses refer to earlier entries by index."""
    exclude: tuple[Clause, ...] = ()
    """Objects whose presence (``count`` or more) makes the original GenEval check fail."""
    prompt: str = ""
    """The text prompt; informational, the rules never read it."""


def parse_metadata(
    raw: Mapping[str, Any] | str | bytes, *, known_classes: Collection[str] | None = None
) -> Metadata:
    """Parse one GenEval metadata record (a mapping or its JSON text) and validate every field.

    ``known_classes``, when given, is the detector's vocabulary: a clause naming a class the detector cannot
    produce would silently score zero forever, so it is rejected instead. Unknown keys are rejected as well,
    because a misspelt ``"color"`` or ``"exclude"`` would otherwise drop a constraint without notice.
    Raises ``ValueError`` naming the offending field.
    """
    record = _load(raw)
    unknown = sorted(set(record) - _TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(
            f"metadata keys must be among {sorted(_TOP_LEVEL_KEYS)}, got unknown key(s) {quote(unknown)}."
        )
    tag = _parse_tag(record)
    include = record.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"include must be a non-empty list of clauses, got {quote(include)}.")
    exclude = record.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError(f"exclude must be a list of clauses, got {quote(exclude)}.")
    prompt = record.get("prompt", "")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}.")
    return Metadata(
        tag=tag,
        include=tuple(
            _parse_clause(
                c,
                f"include[{i}]",
                index=i,
                num_include=len(include),
                allowed_keys=_INCLUDE_KEYS,
                known_classes=known_classes,
            )
            for i, c in enumerate(include)
        ),
        exclude=tuple(
            _parse_clause(
                c,
                f"exclude[{i}]",
                index=i,
                num_include=len(include),
                allowed_keys=_EXCLUDE_KEYS,
                known_classes=known_classes,
            )
            for i, c in enumerate(exclude)
        ),
        prompt=prompt,
    )


def _load(raw: Mapping[str, Any] | str | bytes) -> Mapping[str, Any]:
    if isinstance(raw, str | bytes):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"metadata must be valid JSON, got a parse error: {err}.") from None
    if not isinstance(raw, Mapping):
        raise ValueError(f"metadata must be a JSON object, got {type(raw).__name__}.")
    return raw


def _parse_tag(record: Mapping[str, Any]) -> str:
    if "tag" not in record:
        raise ValueError(f"tag is required and must be one of {list(TAGS)}, got no tag.")
    tag = record["tag"]
    if tag not in TAGS:
        raise ValueError(f"tag must be one of {list(TAGS)}, got {quote(tag)}.")
    return tag


def _parse_clause(
    raw: Any,
    where: str,
    *,
    index: int,
    num_include: int,
    allowed_keys: frozenset[str],
    known_classes: Collection[str] | None,
) -> Clause:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be an object, got {type(raw).__name__}.")
    unknown = sorted(set(raw) - allowed_keys)
    if unknown:
        raise ValueError(
            f"{where} keys must be among {sorted(allowed_keys)}, got unknown key(s) {quote(unknown)}."
        )

    cls = raw.get("class")
    if not isinstance(cls, str) or not cls:
        raise ValueError(f"{where}.class must be a non-empty string, got {quote(cls)}.")
    if known_classes is not None and cls not in known_classes:
        raise ValueError(f"{where}.class must be one of the detector's known classes, got {quote(cls)}.")

    count = raw.get("count")
    # bool is an int subclass; ``true`` is never a meaningful count.
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{where}.count must be an integer >= 1, got {quote(count)}.")

    color = raw.get("color")
    if color is not None and color not in COLORS:
        raise ValueError(f"{where}.color must be one of {list(COLORS)}, got {quote(color)}.")

    position = (
        _parse_position(raw["position"], where, index=index, num_include=num_include)
        if "position" in raw
        else None
    )
    return Clause(cls=cls, count=count, color=color, position=position)


def _parse_position(raw: Any, where: str, *, index: int, num_include: int) -> tuple[str, int]:
    if not isinstance(raw, list | tuple) or len(raw) != 2:
        raise ValueError(f"{where}.position must be a [relation, index] pair, got {quote(raw)}.")
    relation, target = raw
    if relation not in RELATIONS:
        raise ValueError(f"{where}.position[0] must be one of {list(RELATIONS)}, got {quote(relation)}.")
    if not isinstance(target, int) or isinstance(target, bool):
        raise ValueError(f"{where}.position[1] must be an integer clause index, got {quote(target)}.")
    if not 0 <= target < num_include:
        raise ValueError(
            f"{where}.position[1] must be an include clause index in 0..{num_include - 1}, got {target}."
        )
    # The rules resolve targets while walking the clauses in order, so only earlier groups exist yet.
    if index == 0:
        raise ValueError(
            f"{where}.position must be absent because no include clause precedes it, got {quote(raw)}."
        )
    if target >= index:
        raise ValueError(
            f"{where}.position[1] must refer to an earlier include clause (index < {index}), got {target}."
        )
    return relation, target
