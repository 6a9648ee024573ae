"""GenEval's relative position between two boxes (REFERENCE.md §4), vectorised so layouts can test every
candidate.

For an object box A and a target box B: offset = centre_A − centre_B; per axis revised = max(|offset| −
0.1·(dim_A + dim_B), 0)·sign(offset); (dx, dy) = revised / ‖offset‖. "left of" holds when dx < −0.5, "right
of" when dx > 0.5, "above" when dy < −0.5, "below" when dy > 0.5 (y grows downwards); no relation holds when
every |revised| < 1e-3. The rule and its constants are the GenEval format package's
(``services.geneval.rules.relative_position``); this is its vectorised form, for the scene sampler.
"""

from __future__ import annotations

import numpy as np

from services.geneval.rules import NO_OFFSET_EPS as _EPS
from services.geneval.rules import POSITION_CUTOFF as _THRESHOLD
from services.geneval.rules import POSITION_MARGIN as _MARGIN


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
