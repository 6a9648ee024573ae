"""Shape masks and scene drawing without anti-aliasing, so every object pixel carries its exact palette
colour.

Each shape is defined on its bounding box and is *tight*: it touches all four sides of the box, so the
bounding box of the drawn pixels equals the box it was drawn in. The detector relies on that: it re-rasterises
every class at a component's box size and compares masks (``shape_mask`` is shared by both sides).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from shapes.vocab import BACKGROUND_RGB, COLORS


@dataclass(frozen=True, kw_only=True)
class SceneObject:
    """One drawn shape."""

    cls: str
    """Shape class, one of ``shapes.vocab.CLASSES``."""
    color: str
    """Colour name, one of ``shapes.vocab.COLOR_NAMES``."""
    box: tuple[int, int, int, int]
    """(x1, y1, x2, y2) in pixels, x2/y2 exclusive; the shape is tight in this box."""
    clause: int | None = None
    """Index of the include clause this object satisfies, or None for a distractor."""


def _centred_runs(widths: Iterable[int], width: int) -> np.ndarray:
    """Mask whose row r is a horizontally centred run of ``widths[r]`` pixels.

    Callers keep ``width - widths[r]`` even, so runs are exactly centred and the shape is mirror-symmetric.
    """
    widths = np.asarray(list(widths))
    starts = (width - widths) // 2
    cols = np.arange(width)
    return (cols[None, :] >= starts[:, None]) & (cols[None, :] < (starts + widths)[:, None])


def _round_half_up(x: np.ndarray) -> np.ndarray:
    # np.round rounds half to even, which would make run widths depend on parity in an irregular way.
    return np.floor(x + 0.5).astype(int)


def _square(width: int, height: int) -> np.ndarray:
    return np.ones((height, width), dtype=bool)


def _circle(width: int, height: int) -> np.ndarray:
    # Pixel centres inside the inscribed ellipse; for square boxes the middle rows/columns reach the box edges
    # ((1 - 1/s)^2 + (1/s)^2 <= 1), so the mask is tight.
    u = (2 * (np.arange(width) + 0.5) / width - 1) ** 2
    v = (2 * (np.arange(height) + 0.5) / height - 1) ** 2
    return v[:, None] + u[None, :] <= 1.0 + 1e-9


def _triangle(width: int, height: int) -> np.ndarray:
    # Apex up: the top row holds 1 or 2 pixels (matching the width's parity), the bottom row is full.
    apex = 2 - width % 2 if width > 1 else 1
    if height == 1:
        return np.ones((1, width), dtype=bool)
    steps = _round_half_up((width - apex) / 2 * np.arange(height) / (height - 1))
    return _centred_runs(apex + 2 * steps, width)


_BUILDERS: dict[str, Callable[[int, int], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
}


@functools.lru_cache(maxsize=4096)
def shape_mask(cls: str, width: int, height: int) -> np.ndarray:
    """Read-only (height, width) bool mask of ``cls`` filling a ``width`` × ``height`` box."""
    if cls not in _BUILDERS:
        raise ValueError(f"shape class must be one of {sorted(_BUILDERS)}, got {cls!r}.")
    if width < 1 or height < 1:
        raise ValueError(f"shape box must be at least 1×1 pixels, got {width}×{height}.")
    mask = _BUILDERS[cls](width, height)
    mask.setflags(write=False)
    return mask


def draw_scene(objects: Iterable[SceneObject], *, image_size: int) -> np.ndarray:
    """Draw ``objects`` on the background: (image_size, image_size, 3) uint8."""
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND_RGB
    for obj in objects:
        x1, y1, x2, y2 = obj.box
        region = image[y1:y2, x1:x2]
        region[shape_mask(obj.cls, x2 - x1, y2 - y1)] = COLORS[obj.color]
    return image
