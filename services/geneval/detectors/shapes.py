"""The shapes-world detector behind the GenEval :class:`Detector` protocol.

``shapes.detector.ShapesDetector`` segments palette colours exactly, so it reports each object's colour
itself and the service needs no colour classifier: the shapes reward *is* the GenEval service with another
detector.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from services.geneval.detectors import Detections, DetectorConfig, DetectorInfo
from services.geneval.rules import Detection
from shapes.detector import ShapesDetector


class ShapesWorldDetector:
    """Adapter from ``ShapesDetector`` (HWC numpy) to batched (3, H, W) tensors and rule-engine detections."""

    def __init__(self, detector: ShapesDetector | None = None) -> None:
        self._detector = detector or ShapesDetector()
        self._info = DetectorInfo(
            kind="shapes", description="exact", weights_sha256="shapes-exact", provides_color=True
        )

    @classmethod
    def build(cls, config: DetectorConfig, *, tiny: bool = False) -> ShapesWorldDetector:
        # The classical detector has no weights, so tiny and real are the same object.
        if config.weights is not None:
            raise ValueError(f"the shapes detector has no weights; drop --detector-weights {config.weights}.")
        return cls()

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self._detector.classes)

    @property
    def info(self) -> DetectorInfo:
        return self._info

    def detect(self, images: Sequence[torch.Tensor]) -> list[Detections]:
        arrays = [image.permute(1, 2, 0).numpy() for image in images]
        if not arrays:
            return []
        # The vectorised path needs one size; a mixed batch falls back to one call per image.
        if len({a.shape for a in arrays}) == 1:
            raw = self._detector.detect_batch(np.stack(arrays))
        else:
            raw = [self._detector.detect(a) for a in arrays]
        return [
            {
                cls: [Detection(box=d.box, score=d.score, mask=d.mask, color=d.color) for d in dets]
                for cls, dets in per_image.items()
            }
            for per_image in raw
        ]
