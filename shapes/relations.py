"""GenEval's relative position between two boxes (REFERENCE.md §4), vectorised so layouts can test every
candidate.

For an object box A and a target box B: offset = centre_A − centre_B; per axis revised = max(|offset| −
0.1·(dim_A + dim_B), 0)·sign(offset); (dx, dy) = revised / ‖offset‖. "left of" holds when dx < −0.5, "right
of" when dx > 0.5, "above" when dy < −0.5, "below" when dy > 0.5 (y grows downwards); no relation holds when
every |revised| < 1e-3. The shapes package keeps its own copy because it must not import the services.
"""

from __future__ import annotations

import numpy as np

Box = tuple[float, float, float, float]

_MARGIN = 0.1  # GenEval's fraction of the summed box dimensions that an offset must exceed.
_THRESHOLD = 0.5  # GenEval's threshold on the normalised revised offset.
_EPS = 1e-3  # GenEval's "no relation" cut-off on the revised offset.


def relation_components(
    offset_x: np.ndarray, offset_y: np.ndarray, dim_sum_x: np.ndarray, dim_sum_y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised revised offsets (dx, dy); all arguments broadcast together, results have the broadcast
    shape.

    ``dim_sum_x`` is width_A + width_B and ``dim_sum_y`` height_A + height_B. Where every revised component is
    below GenEval's cut-off both results are 0, so no relation can hold there.
    """
    offset_x, offset_y = np.broadcast_arrays(np.asarray(offset_x, float), np.asarray(offset_y, float))
    revised_x = np.maximum(np.abs(offset_x) - _MARGIN * dim_sum_x, 0.0) * np.sign(offset_x)
    revised_y = np.maximum(np.abs(offset_y) - _MARGIN * dim_sum_y, 0.0) * np.sign(offset_y)
    norm = np.hypot(offset_x, offset_y)
    none = (np.abs(revised_x) < _EPS) & (np.abs(revised_y) < _EPS)
    safe_norm = np.where(none, 1.0, norm)
    return np.where(none, 0.0, revised_x / safe_norm), np.where(none, 0.0, revised_y / safe_norm)


def relations_from_components(dx: float, dy: float) -> set[str]:
    """The set of relations that (dx, dy) satisfies; may hold two (diagonal) or none."""
    found = set()
    if dx < -_THRESHOLD:
        found.add("left of")
    if dx > _THRESHOLD:
        found.add("right of")
    if dy < -_THRESHOLD:
        found.add("above")
    if dy > _THRESHOLD:
        found.add("below")
    return found


def relative_position(box: Box, target: Box) -> set[str]:
    """Relations of ``box`` with respect to ``target``; boxes are (x1, y1, x2, y2)."""
    offset_x = (box[0] + box[2]) / 2 - (target[0] + target[2]) / 2
    offset_y = (box[1] + box[3]) / 2 - (target[1] + target[3]) / 2
    dim_x = (box[2] - box[0]) + (target[2] - target[0])
    dim_y = (box[3] - box[1]) + (target[3] - target[1])
    dx, dy = relation_components(np.float64(offset_x), np.float64(offset_y), dim_x, dim_y)
    return relations_from_components(float(dx), float(dy))


def holds_only(dx: np.ndarray, dy: np.ndarray, relation: str, margin: float) -> np.ndarray:
    """Where ``relation`` holds by at least ``margin`` beyond GenEval's threshold and no other relation comes
    within ``margin`` of holding — so the depicted relation is unambiguous. Element-wise over (dx, dy)."""
    along, across, sign = {
        "left of": (dx, dy, -1.0),
        "right of": (dx, dy, 1.0),
        "above": (dy, dx, -1.0),
        "below": (dy, dx, 1.0),
    }[relation]
    return (sign * along > _THRESHOLD + margin) & (np.abs(across) < _THRESHOLD - margin)
