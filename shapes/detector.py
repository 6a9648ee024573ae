"""Exact classical shapes-world detector: colour segmentation → connected components → shape classes.

1. Each pixel takes the nearest palette colour (background grey included) if it lies within
   ``max_color_distance``; anything farther — blends at a generated image's edges, off-palette noise — is
   background.
2. Same-colour 8-connected pixels form components (``shapes.components``); components under ``min_area`` are
   dropped as specks.
3. A component's class is the shape whose mask, rasterised at the component's box size by the renderer's own
   ``shape_mask``, overlaps it best (IoU). On rendered scenes the right class matches with IoU 1 and the
   others with at most 0.9, so detection is exact; on generated images the nearest shape wins as long as it
   reaches ``min_shape_iou`` and the box is not too elongated.

Output mirrors an object detector's: per class a list of detections with box, score, mask and colour, ready
for the GenEval rule engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from shapes.components import label_components
from shapes.raster import shape_mask
from shapes.vocab import BACKGROUND_RGB, CLASSES, COLOR_NAMES, COLORS


@dataclass(kw_only=True)
class ShapesDetectorConfig:
    """Thresholds of the classical detector."""

    max_color_distance: float = 60.0
    """Euclidean RGB distance (0–255 units) within which a pixel takes a palette colour. Below half the
    smallest distance between palette entries (127, orange–yellow), so a pixel is never within reach of two
    colours; a blend half-way between an object colour and the background is 110+ from both and falls out."""
    min_area: int = 8
    """Components with fewer pixels are ignored (speckle in generated images). The smallest shape the scene
    layout draws, a 9 px triangle, has 49 pixels; a 5 px one still has 17."""
    max_aspect_ratio: float = 1.5
    """Components whose box is more elongated than this (long side / short side) are not any class: rendered
    shapes are square, and a stretched blob (e.g. two merged shapes) should not count as one."""
    min_shape_iou: float = 0.6
    """A component is kept only if its best shape template reaches this IoU; on rendered scenes the true class
    scores 1.0."""
    connectivity: Literal[4, 8] = 8
    """Pixel connectivity of components; rendered objects keep a 1 px gap, so 8 never merges two of them."""
    batch_chunk: int = 256
    """Images segmented per vectorised chunk in ``detect_batch`` (bounds temporary memory)."""

    def __post_init__(self) -> None:
        if self.max_color_distance <= 0:
            raise ValueError(f"max_color_distance must be > 0, got {self.max_color_distance}.")
        if self.min_area < 1:
            raise ValueError(f"min_area must be >= 1, got {self.min_area}.")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}.")
        if not 0.0 <= self.min_shape_iou <= 1.0:
            raise ValueError(f"min_shape_iou must be in [0, 1], got {self.min_shape_iou}.")


# eq=False: the mask is an array, and a generated __eq__ would raise on comparing two detections.
@dataclass(frozen=True, eq=False)
class ShapeDetection:
    """One detected shape."""

    box: tuple[float, float, float, float]
    """(x1, y1, x2, y2) in pixels; x2/y2 exclusive (max + 1)."""
    score: float
    """Always 1.0: the pipeline is deterministic and has no confidence."""
    mask: np.ndarray
    """(H, W) bool mask of the component."""
    color: str
    """Palette colour name of the component."""


Detections = dict[str, list[ShapeDetection]]

# Palette row k < len(COLOR_NAMES) is that colour; the last row is the background.
_PALETTE = np.array([*(COLORS[c] for c in COLOR_NAMES), BACKGROUND_RGB], dtype=np.int32)
_BACKGROUND = len(COLOR_NAMES)
_PALETTE_T = _PALETTE.T.astype(np.float32)
_PALETTE_SQ = (_PALETTE.astype(np.float32) ** 2).sum(axis=1)


class ShapesDetector:
    """Detector for shapes-world images (any size, uint8 RGB)."""

    classes: tuple[str, ...] = CLASSES

    def __init__(self, config: ShapesDetectorConfig | None = None) -> None:
        self.config = config or ShapesDetectorConfig()

    def detect(self, image: np.ndarray) -> Detections:
        """Detections per class (every class is a key) for one (H, W, 3) uint8 image, in raster order."""
        return self.detect_batch(np.asarray(image)[None])[0]

    def detect_batch(self, images: np.ndarray | Sequence[np.ndarray]) -> list[Detections]:
        """``detect`` for (B, H, W, 3) uint8 images; segmentation and labelling are vectorised."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}.")
        results: list[Detections] = []
        for start in range(0, len(images), self.config.batch_chunk):
            results.extend(self._detect_chunk(images[start : start + self.config.batch_chunk]))
        return results

    def segment_colors(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W) int: index into ``COLOR_NAMES`` of each pixel's colour, −1 for background."""
        pixels = images.reshape(-1, 3).astype(np.float32)
        # Squared distances as |p|² − 2p·c + |c|²: every term is an integer below 2**24, so float32 is exact.
        dist = (pixels**2).sum(axis=1, keepdims=True) - 2.0 * pixels @ _PALETTE_T + _PALETTE_SQ
        best = dist.argmin(axis=1)
        best_dist = np.take_along_axis(dist, best[:, None], axis=1)[:, 0]
        keep = (best != _BACKGROUND) & (best_dist <= self.config.max_color_distance**2)
        return np.where(keep, best, -1).reshape(images.shape[:3])

    def _detect_chunk(self, images: np.ndarray) -> list[Detections]:
        batch, height, width = images.shape[:3]
        colors = self.segment_colors(images)
        ids = label_components(colors, self.config.connectivity)
        roots, areas = np.unique(ids[ids >= 0], return_counts=True)
        results: list[Detections] = [{cls: [] for cls in self.classes} for _ in range(batch)]
        flat_colors = colors.reshape(-1)
        for root, area in zip(roots.tolist(), areas.tolist(), strict=True):
            if area < self.config.min_area:
                continue
            b = root // (height * width)
            mask = ids[b] == root
            found = self._classify(mask)
            if found is None:
                continue
            cls, box = found
            color = COLOR_NAMES[flat_colors[root]]
            results[b][cls].append(ShapeDetection(box=box, score=1.0, mask=mask, color=color))
        return results

    def _classify(self, mask: np.ndarray) -> tuple[str, tuple[float, float, float, float]] | None:
        """Best-matching class and the tight box of a component mask, or None if no class fits."""
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        y1, y2, x1, x2 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        w, h = x2 - x1, y2 - y1
        if max(w, h) > self.config.max_aspect_ratio * min(w, h):
            return None
        crop = mask[y1:y2, x1:x2]
        area = int(crop.sum())
        best_cls, best_iou = None, -1.0
        for cls in self.classes:
            template = shape_mask(cls, w, h)
            inter = int(np.count_nonzero(crop & template))
            iou = inter / (area + int(template.sum()) - inter)
            if iou > best_iou:
                best_cls, best_iou = cls, iou
        if best_iou < self.config.min_shape_iou:
            return None
        return best_cls, (float(x1), float(y1), float(x2), float(y2))
