"""Object detectors for the GenEval service, behind one :class:`Detector` protocol.

A detector turns a batch of images into raw per-class detections (box, score, optional mask, optional colour);
the GenEval rules then filter and judge them. Two are registered:

- ``shapes``: the exact classical detector of the shapes world; it reports each object's palette colour.
- ``ultralytics``: a COCO-80 YOLO detect or segment model; colours come from the CLIP colour classifier.

Builders import their heavy dependencies only when called, so serving shapes never imports ultralytics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from services.geneval.rules import Detection

Detections = dict[str, list[Detection]]
"""Class name → that class's raw detections, in any order and at any score."""


@dataclass(frozen=True, kw_only=True)
class DetectorInfo:
    """What the service reports about its detector (Describe's version and checkpoint hash)."""

    kind: str
    """Registry name, e.g. ``"ultralytics"``."""
    description: str
    """Model and settings that change detections, e.g. ``"yolo11n-seg.pt conf=0.3 imgsz=640"``."""
    weights_sha256: str
    """sha256 of the weights file, ``"tiny:<seed>"`` for random weights, ``"shapes-exact"`` for no weights."""
    provides_color: bool
    """Whether every detection carries its colour, so no colour classifier is needed."""


@dataclass(kw_only=True)
class DetectorConfig:
    """Options shared by the detector builders; each builder rejects the ones it cannot honour."""

    weights: str | None = None
    """Weights file, or for ultralytics a model YAML (random weights, ``--tiny`` only). None: the detector's
    default (shapes: none needed; ultralytics with ``--tiny``: ``yolo11n-seg.yaml``)."""
    conf: float = 0.3
    """Confidence below which the detector itself drops boxes. Must not exceed the rules' thresholds (0.3 and
    0.9 in GenEval), or boxes the rules would keep never reach them."""
    imgsz: int = 640
    """Inference size (long side, pixels) the detector resizes to; ultralytics' default 640."""
    max_det: int = 300
    """At most this many detections per image before the rules' per-class cap; ultralytics' default."""
    seed: int = 0
    """Seed of the random weights built from a model YAML."""
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf < 1.0:
            raise ValueError(f"detector conf must be in [0, 1), got {self.conf}.")
        if self.imgsz < 32:
            raise ValueError(f"detector imgsz must be >= 32 pixels, got {self.imgsz}.")
        if self.max_det < 1:
            raise ValueError(f"detector max_det must be >= 1, got {self.max_det}.")


@runtime_checkable
class Detector(Protocol):
    """Batched object detection over a fixed class vocabulary."""

    @property
    def class_names(self) -> tuple[str, ...]:
        """Every class the detector can report, spelt as in GenEval metadata."""
        ...

    @property
    def info(self) -> DetectorInfo: ...

    def detect(self, images: Sequence[torch.Tensor]) -> list[Detections]:
        """Raw detections for each (3, H, W) uint8 RGB image; boxes in pixels of that image, masks (H, W)."""
        ...


def _build_shapes(config: DetectorConfig, *, tiny: bool) -> Detector:
    from services.geneval.detectors.shapes import ShapesWorldDetector

    return ShapesWorldDetector.build(config, tiny=tiny)


def _build_ultralytics(config: DetectorConfig, *, tiny: bool) -> Detector:
    from services.geneval.detectors.yolo import UltralyticsDetector

    return UltralyticsDetector.build(config, tiny=tiny)


DETECTORS: dict[str, Callable[..., Detector]] = {
    "shapes": _build_shapes,
    "ultralytics": _build_ultralytics,
}
"""Detector name → builder ``(config, *, tiny) -> Detector``."""


def build_detector(kind: str, config: DetectorConfig | None = None, *, tiny: bool = False) -> Detector:
    """Build a registered detector; raises ValueError for an unknown name or unusable options."""
    if kind not in DETECTORS:
        raise ValueError(f"detector must be one of {sorted(DETECTORS)}, got {kind!r}.")
    return DETECTORS[kind](config or DetectorConfig(), tiny=tiny)
