"""Scene layout: where each object of a GenEval metadata record goes, with what size and colour.

Objects are placed one at a time by choosing uniformly among all top-left corners that keep a gap to every
object already placed (and, for a position clause, that satisfy its relation to every object of the target
clause), so a layout never overlaps and never needs rejection sampling per object; only an unlucky early
choice that leaves no room for a later object restarts the scene.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shapes.raster import SceneObject
from shapes.relations import holds_only, relation_components
from shapes.vocab import CLASSES, COLOR_NAMES, RELATIONS, TAGS

MIN_OBJECT_SIZE = 5
"""Smallest side in pixels at which the shape classes still rasterise to different masks."""


@dataclass(kw_only=True)
class SceneConfig:
    """How scenes are laid out and drawn."""

    image_size: int = 32
    """Side of the square RGB image in pixels."""
    object_size_frac: tuple[float, float] = (9 / 32, 13 / 32)
    """Inclusive range of an object's side as a fraction of ``image_size``: 9–13 px at 32 px, small enough
    that four objects or a clear two-object relation always fit, large enough that a model patching the image
    into 4×4 tokens can still draw the corners that separate the classes (6–10 px priors rounded squares into
    circles; docs/shapes.md)."""
    min_gap_px: int = 1
    """Empty pixels kept between any two objects' boxes (Chebyshev distance), so 8-connected components never
    merge and detection is exact."""
    relation_margin: float = 0.1
    """Extra margin on GenEval's 0.5 threshold for placed relations: the intended relation exceeds 0.5 +
    margin and the perpendicular relations stay below 0.5 − margin, so the image depicts one relation
    unambiguously."""
    max_distractors: int = 0
    """Up to this many extra objects (uniform count) of classes the metadata does not mention. 0 keeps every
    image faithful to its prompt, which is what a text-to-image prior should learn from."""
    max_attempts: int = 200
    """Layout restarts before giving up on a record (only reached for records that barely fit)."""

    def __post_init__(self) -> None:
        lo, hi = self.object_size_range()
        if lo < MIN_OBJECT_SIZE or hi < lo or hi > self.image_size:
            raise ValueError(
                f"object_size_frac must give sides within {MIN_OBJECT_SIZE}..image_size px with min <= max, "
                f"got {lo}..{hi} px for image_size {self.image_size}."
            )
        if self.min_gap_px < 1:
            raise ValueError(f"min_gap_px must be >= 1 so objects never touch, got {self.min_gap_px}.")
        if not 0.0 <= self.relation_margin < 0.5:
            raise ValueError(f"relation_margin must be in [0, 0.5), got {self.relation_margin}.")

    def object_size_range(self) -> tuple[int, int]:
        """Inclusive (min, max) object side in pixels."""
        lo, hi = self.object_size_frac
        return round(lo * self.image_size), round(hi * self.image_size)


@dataclass(frozen=True, kw_only=True)
class _Clause:
    cls: str
    count: int
    color: str | None
    position: tuple[str, int] | None


def parse_clauses(metadata: Mapping[str, Any]) -> tuple[list[_Clause], dict[str, int]]:
    """Check that ``metadata`` is a GenEval record the shapes world can depict.

    Returns the include clauses and, per excluded class, the count at which the image would fail. Raises
    ``ValueError`` for unknown tags, classes, colours or relations, for position targets that are not earlier
    clauses, for two include clauses of one class (their objects would count for each other) and for an
    exclude that contradicts an include.
    """
    if metadata.get("tag") not in TAGS:
        raise ValueError(f"metadata tag must be one of {list(TAGS)}, got {metadata.get('tag')!r}.")
    raw_include = metadata.get("include")
    if not isinstance(raw_include, list) or not raw_include:
        raise ValueError(f"metadata include must be a non-empty list, got {raw_include!r}.")
    clauses = []
    for i, raw in enumerate(raw_include):
        if not isinstance(raw, Mapping):
            raise ValueError(f"include[{i}] must be an object, got {raw!r}.")
        cls, count, color = raw.get("class"), raw.get("count"), raw.get("color")
        if cls not in CLASSES:
            raise ValueError(f"include[{i}].class must be one of {list(CLASSES)}, got {cls!r}.")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"include[{i}].count must be an integer >= 1, got {count!r}.")
        if color is not None and color not in COLOR_NAMES:
            raise ValueError(f"include[{i}].color must be one of {list(COLOR_NAMES)}, got {color!r}.")
        position = raw.get("position")
        if position is not None:
            relation, target = position
            if relation not in RELATIONS or not isinstance(target, int) or not 0 <= target < i:
                raise ValueError(
                    f"include[{i}].position must be [relation in {list(RELATIONS)}, index of an earlier "
                    f"clause], got {position!r}."
                )
            position = (relation, target)
        clauses.append(_Clause(cls=cls, count=count, color=color, position=position))
    classes = [c.cls for c in clauses]
    if len(set(classes)) != len(classes):
        raise ValueError(f"include clauses must name distinct classes, got {classes}.")
    exclude = {}
    for i, raw in enumerate(metadata.get("exclude", [])):
        if not isinstance(raw, Mapping):
            raise ValueError(f"exclude[{i}] must be an object, got {raw!r}.")
        cls, count = raw.get("class"), raw.get("count")
        wanted = sum(c.count for c in clauses if c.cls == cls)
        if cls not in CLASSES or not isinstance(count, int) or count <= wanted:
            raise ValueError(
                f"exclude[{i}] must name a known class with a count above the included {wanted}, got {raw!r}."
            )
        exclude[cls] = count
    return clauses, exclude


def plan_scene(
    metadata: Mapping[str, Any], rng: np.random.Generator, config: SceneConfig
) -> list[SceneObject]:
    """Objects (with boxes and colours) that satisfy ``metadata`` under GenEval's rules.

    Each include clause gets exactly ``count`` objects of its class; clauses without a colour get an
    independent uniform colour per object; position clauses satisfy their relation to every target object
    exclusively (see ``SceneConfig.relation_margin``). Distractors use only classes the metadata never names.
    """
    clauses, exclude = parse_clauses(metadata)
    named = {c.cls for c in clauses} | set(exclude)
    distractor_classes = [c for c in CLASSES if c not in named]
    for _ in range(config.max_attempts):
        objects = _try_layout(clauses, distractor_classes, rng, config)
        if objects is not None:
            return objects
    raise RuntimeError(
        f"no layout found in {config.max_attempts} attempts for {metadata.get('prompt', metadata)!r} "
        f"at image_size {config.image_size}; use fewer or smaller objects."
    )


def _try_layout(
    clauses: list[_Clause], distractor_classes: list[str], rng: np.random.Generator, config: SceneConfig
) -> list[SceneObject] | None:
    lo, hi = config.object_size_range()
    placed: list[SceneObject] = []
    for index, clause in enumerate(clauses):
        for _ in range(clause.count):
            size = int(rng.integers(lo, hi + 1))
            allowed = _free_corners(placed, size, config)
            if clause.position is not None:
                relation, target = clause.position
                for other in placed:
                    if other.clause == target:
                        allowed &= _relation_corners(other.box, size, relation, config)
            box = _pick_corner(allowed, size, rng)
            if box is None:
                return None
            color = clause.color or COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
            placed.append(SceneObject(cls=clause.cls, color=color, box=box, clause=index))
    if distractor_classes and config.max_distractors > 0:
        for _ in range(int(rng.integers(0, config.max_distractors + 1))):
            size = int(rng.integers(lo, hi + 1))
            box = _pick_corner(_free_corners(placed, size, config), size, rng)
            if box is None:
                return None
            cls = distractor_classes[rng.integers(len(distractor_classes))]
            placed.append(SceneObject(cls=cls, color=COLOR_NAMES[rng.integers(len(COLOR_NAMES))], box=box))
    return placed


def _free_corners(placed: list[SceneObject], size: int, config: SceneConfig) -> np.ndarray:
    """(n, n) bool over top-left corners (y, x) of a ``size`` box that keep ``min_gap_px`` to every placed
    box."""
    n = config.image_size - size + 1
    free = np.ones((n, n), dtype=bool)
    gap = config.min_gap_px
    for obj in placed:
        x1, y1, x2, y2 = obj.box
        # A corner c collides when c < x2 + gap and c + size > x1 - gap.
        free[
            max(0, y1 - gap - size + 1) : max(0, y2 + gap), max(0, x1 - gap - size + 1) : max(0, x2 + gap)
        ] = False
    return free


def _relation_corners(
    target: tuple[int, int, int, int], size: int, relation: str, config: SceneConfig
) -> np.ndarray:
    """(n, n) bool over top-left corners of a ``size`` box for which only ``relation`` to ``target`` holds."""
    n = config.image_size - size + 1
    centres = np.arange(n) + size / 2
    tx1, ty1, tx2, ty2 = target
    dx, dy = relation_components(
        centres[None, :] - (tx1 + tx2) / 2,
        centres[:, None] - (ty1 + ty2) / 2,
        size + (tx2 - tx1),
        size + (ty2 - ty1),
    )
    return holds_only(dx, dy, relation, config.relation_margin)


def _pick_corner(
    allowed: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[int, int, int, int] | None:
    candidates = np.flatnonzero(allowed)
    if candidates.size == 0:
        return None
    y, x = divmod(int(candidates[rng.integers(candidates.size)]), allowed.shape[1])
    return (x, y, x + size, y + size)
