"""GenEval rule engine: per-class detections to the partial-credit reward and the original GenEval verdict.

Pure functions over already-computed detections: no model, no image. The service layer runs the detector,
classifies the colour of each detection, and then calls :func:`evaluate`. Semantics follow ``REFERENCE.md``
§4 "GenEval": the training reward is flow_grpo's partial-credit variant of the GenEval check, and
``correct`` is the original GenEval correctness used as the evaluation metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.geneval.metadata import COLORS, RELATIONS, Clause, Metadata

POSITION_MARGIN = 0.1
"""GenEval's fraction of the summed box sizes an offset must exceed, per axis."""
POSITION_CUTOFF = 0.5
"""GenEval's threshold on the normalised revised offset."""
NO_OFFSET_EPS = 1e-3
"""Below this (pixels, per axis) the margin-revised offset counts as "no offset at all", as upstream."""


@dataclass(frozen=True, kw_only=True, eq=False)
class Detection:
    """One detected object. ``eq=False`` because the mask is an array and identity is what matters."""

    box: tuple[float, float, float, float]
    """``(x1, y1, x2, y2)`` in pixels, y pointing down."""
    score: float
    """Detector confidence in [0, 1]."""
    mask: np.ndarray | None = None
    """Boolean instance mask of shape ``(H, W)``, or None for a box-only detector; the rules never read it."""
    color: str | None = None
    """One of ``COLORS`` once the service's colour classifier has run, else None."""

    def __post_init__(self) -> None:
        if len(self.box) != 4:
            raise ValueError(f"Detection.box must have 4 values (x1, y1, x2, y2), got {len(self.box)}.")
        box = tuple(float(v) for v in self.box)
        if not all(math.isfinite(v) for v in box) or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"Detection.box must be finite with x1 <= x2 and y1 <= y2, got {box}.")
        object.__setattr__(self, "box", box)
        if not math.isfinite(self.score):
            raise ValueError(f"Detection.score must be a finite number, got {self.score}.")
        if self.mask is not None and (self.mask.ndim != 2 or self.mask.dtype != np.bool_):
            raise ValueError(
                f"Detection.mask must be a bool array of shape (H, W), "
                f"got {self.mask.dtype} {self.mask.shape}."
            )
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"Detection.color must be None or one of {list(COLORS)}, got {self.color!r}.")


@dataclass(frozen=True, kw_only=True)
class RuleConfig:
    """Thresholds of the GenEval rules; defaults are GenEval's (REFERENCE.md §4)."""

    score_threshold: float = 0.3
    """Keep detections with score strictly above this, for every tag but ``counting``. GenEval: 0.3."""
    counting_score_threshold: float = 0.9
    """Same for ``counting`` prompts, where a spurious low-confidence box changes the count. GenEval: 0.9."""
    max_per_class: int = 16
    """Keep at most this many detections per class, highest score first. GenEval: 16."""
    position_margin: float = POSITION_MARGIN
    """Fraction of the summed box sizes subtracted from the centre offset per axis, so overlapping boxes
    of similar position are not called left/right/above/below. GenEval: 0.1."""
    position_cutoff: float = POSITION_CUTOFF
    """A relation holds when the revised offset, divided by the raw offset's length, passes this along the
    axis. GenEval: 0.5."""
    extra_position_credit: bool = False
    """Reproduce flow_grpo's reward quirk: append an extra 1.0 after a failed position check. Default off."""

    def __post_init__(self) -> None:
        for name in ("score_threshold", "counting_score_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"RuleConfig.{name} must be in [0, 1), got {value}.")
        if self.max_per_class < 1:
            raise ValueError(f"RuleConfig.max_per_class must be >= 1, got {self.max_per_class}.")
        if self.position_margin < 0.0:
            raise ValueError(f"RuleConfig.position_margin must be >= 0, got {self.position_margin}.")
        if not 0.0 < self.position_cutoff < 1.0:
            raise ValueError(f"RuleConfig.position_cutoff must be in (0, 1), got {self.position_cutoff}.")


@dataclass(frozen=True, kw_only=True)
class GenEvalResult:
    """Outcome of one image against one metadata record."""

    score: float
    """Partial-credit training reward: mean of the per-check credits, may be negative (over-counting)."""
    strict: bool
    """Every include clause matched exactly (exact counts, all colours, all positions)."""
    correct: bool
    """Original GenEval correctness, the evaluation metric (top-``count`` boxes, exclude clauses)."""
    tag: str
    """The record's tag, so callers can average per tag."""


def score_threshold(tag: str, config: RuleConfig) -> float:
    """Detection threshold for a tag: counting prompts need confident boxes, as each one changes the count."""
    return config.counting_score_threshold if tag == "counting" else config.score_threshold


def filter_detections(
    detections: Mapping[str, Sequence[Detection]], *, threshold: float, max_per_class: int
) -> dict[str, list[Detection]]:
    """Keep ``score > threshold``, highest score first, at most ``max_per_class`` per class.

    No NMS: duplicate suppression is the detector's job. The sort is stable, so equal scores keep the
    detector's order (upstream leaves ties arbitrary; real detectors do not produce them).
    """
    kept: dict[str, list[Detection]] = {}
    for cls, dets in detections.items():
        above = sorted((d for d in dets if d.score > threshold), key=lambda d: d.score, reverse=True)
        kept[cls] = above[:max_per_class]
    return kept


def relative_position(
    obj_box: Sequence[float],
    target_box: Sequence[float],
    *,
    margin: float = POSITION_MARGIN,
    cutoff: float = POSITION_CUTOFF,
) -> frozenset[str]:
    """Relations of the object to the target, e.g. ``{"left of", "above"}``; empty when they overlap too much.

    Boxes are ``(x1, y1, x2, y2)`` with y pointing down. Per axis the centre offset is shrunk by
    ``margin * (size_obj + size_target)`` so that large overlapping boxes are not ordered by a few pixels;
    the shrunk offset is then divided by the length of the *raw* offset, as GenEval does, so a relation
    needs both a clear gap and a dominant direction.
    """
    ox1, oy1, ox2, oy2 = obj_box
    tx1, ty1, tx2, ty2 = target_box
    offset = ((ox1 + ox2) / 2 - (tx1 + tx2) / 2, (oy1 + oy2) / 2 - (ty1 + ty2) / 2)
    sizes = ((ox2 - ox1) + (tx2 - tx1), (oy2 - oy1) + (ty2 - ty1))
    revised = [math.copysign(max(abs(o) - margin * s, 0.0), o) for o, s in zip(offset, sizes, strict=True)]
    if all(abs(r) < NO_OFFSET_EPS for r in revised):
        return frozenset()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    relations = set()
    if dx < -cutoff:
        relations.add("left of")
    if dx > cutoff:
        relations.add("right of")
    if dy < -cutoff:
        relations.add("above")
    if dy > cutoff:
        relations.add("below")
    return frozenset(relations)


def partial_credit(
    metadata: Metadata, kept: Mapping[str, Sequence[Detection]], config: RuleConfig
) -> tuple[float, bool]:
    """Training reward and strict match, clause by clause as REFERENCE.md §4 steps 1-5.

    Over-detection is penalised linearly, so a clause's count credit ``1 - |count - found| / count`` goes
    negative once more than twice the requested objects are found; colour and position credits are only
    earned when the count is exact. Returns ``(score, strict)``; score is 0 when nothing was appended.
    """
    credits: list[float] = []
    groups: list[Sequence[Detection] | None] = []
    strict = True
    for clause in metadata.include:
        found = kept.get(clause.cls, [])
        n = clause.count
        credits.append(1.0 - abs(n - len(found)) / n)
        matched = len(found) == n
        if not matched:
            # One placeholder for the attribute checks the wrong count made impossible.
            if clause.color is not None or clause.position is not None:
                credits.append(0.0)
        else:
            if clause.color is not None:
                k = _num_in_color(found, clause)
                credits.append(1.0 - abs(n - k) / n)
                matched = k == n
            if matched and clause.position is not None:
                relation, target = clause.position
                targets = _target_group(groups, target)
                if targets is None:
                    credits.append(0.0)
                    matched = False
                elif _all_related(found, targets, relation, config):
                    credits.append(1.0)
                else:
                    credits.append(0.0)
                    matched = False
                    if config.extra_position_credit:
                        # flow_grpo appends 1.0 unconditionally after its relation loop.
                        credits.append(1.0)
        groups.append(found if matched else None)
        strict = strict and matched
    score = sum(credits) / len(credits) if credits else 0.0
    return score, strict


def geneval_correct(metadata: Metadata, kept: Mapping[str, Sequence[Detection]], config: RuleConfig) -> bool:
    """Original GenEval correctness: each include clause judged on its top-``count`` boxes, then excludes.

    Unlike the training reward, extra detections beyond ``count`` do not fail an include clause; the
    exclude clauses (``count + 1`` for counting prompts) are what catch over-generation.
    """
    correct = True
    groups: list[Sequence[Detection] | None] = []
    # Every clause is evaluated even after a failure so a missing colour always surfaces as an error.
    for clause in metadata.include:
        found = kept.get(clause.cls, [])[: clause.count]
        matched = len(found) >= clause.count
        if matched and clause.color is not None:
            matched = _num_in_color(found, clause) >= clause.count
        if matched and clause.position is not None:
            relation, target = clause.position
            targets = _target_group(groups, target)
            matched = targets is not None and _all_related(found, targets, relation, config)
        groups.append(found if matched else None)
        correct = correct and matched
    for clause in metadata.exclude:
        if len(kept.get(clause.cls, [])) >= clause.count:
            correct = False
    return correct


def evaluate(
    metadata: Metadata, detections: Mapping[str, Sequence[Detection]], config: RuleConfig | None = None
) -> GenEvalResult:
    """Score one image: filter the raw detections for the record's tag, then apply both rule sets.

    ``detections`` maps class name to that class's raw detections (any order, any score). Colour clauses
    read ``Detection.color``, which the caller must have filled: a detection the rules need to colour-check
    without a colour raises ``ValueError`` rather than counting as a wrong colour.
    """
    config = config if config is not None else RuleConfig()
    kept = filter_detections(
        detections, threshold=score_threshold(metadata.tag, config), max_per_class=config.max_per_class
    )
    score, strict = partial_credit(metadata, kept, config)
    return GenEvalResult(
        score=score, strict=strict, correct=geneval_correct(metadata, kept, config), tag=metadata.tag
    )


def _num_in_color(dets: Sequence[Detection], clause: Clause) -> int:
    """How many detections have the clause's colour; a missing colour is a caller bug, not a mismatch."""
    for i, det in enumerate(dets):
        if det.color is None:
            raise ValueError(
                f"Detection.color of {clause.cls!r} detection {i} must be set to check colour "
                f"{clause.color!r}, got None."
            )
    return sum(det.color == clause.color for det in dets)


def _target_group(groups: Sequence[Sequence[Detection] | None], target: int) -> Sequence[Detection] | None:
    """Group of an earlier clause; ``parse_metadata`` guarantees the index, hand-built metadata may not."""
    if not 0 <= target < len(groups):
        raise ValueError(
            f"position index must refer to an earlier include clause (< {len(groups)}), got {target}."
        )
    return groups[target]


def _all_related(
    objs: Sequence[Detection], targets: Sequence[Detection], relation: str, config: RuleConfig
) -> bool:
    """Every object stands in ``relation`` to every target (GenEval's all-pairs rule)."""
    if relation not in RELATIONS:
        raise ValueError(f"position relation must be one of {list(RELATIONS)}, got {relation!r}.")
    margin, cutoff = config.position_margin, config.position_cutoff
    return all(
        relation in relative_position(obj.box, target.box, margin=margin, cutoff=cutoff)
        for obj in objs
        for target in targets
    )
