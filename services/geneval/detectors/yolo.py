"""COCO-80 YOLO detector (ultralytics) behind the GenEval :class:`Detector` protocol.

Upstream GenEval detects with Mask2Former (mmdetection 2.x); here an ultralytics detect or segment model
plays that part. Class names come from ultralytics' bundled ``coco.yaml``, renamed to GenEval's spelling.
Segment models return instance masks at the input resolution (``retina_masks``), which the colour
classifier composites on grey exactly as upstream does with Mask2Former's masks; detect models give boxes
only, and the colour crop falls back to the box.

Nothing is ever downloaded: ultralytics is imported with ``YOLO_OFFLINE=1`` (its import otherwise probes
DNS), and a weights argument must be an existing file or a model YAML, which ultralytics builds from its
bundled configs with random weights (tests and ``--tiny`` only).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.core.hashing import file_sha256
from services.geneval.coco import geneval_names
from services.geneval.detectors import Detections, DetectorConfig, DetectorInfo
from services.geneval.rules import Detection

TINY_MODEL_YAML = "yolo11n-seg.yaml"
"""Model built with random weights under ``--tiny`` when no YAML is given."""

_YAML_SUFFIXES = (".yaml", ".yml")


def _import_ultralytics() -> Any:
    os.environ["YOLO_OFFLINE"] = "1"
    import ultralytics

    return ultralytics


def coco_class_names() -> tuple[str, ...]:
    """The 80 names of ultralytics' bundled ``coco.yaml`` in label order, GenEval spelling."""
    _import_ultralytics()
    from ultralytics.utils import ROOT, YAML

    names = YAML.load(ROOT / "cfg" / "datasets" / "coco.yaml")["names"]
    return geneval_names(tuple(names[i] for i in range(len(names))))


class UltralyticsDetector:
    """A YOLO detect/segment model over COCO-80; masks (segment models) at the image's own resolution."""

    def __init__(self, model: Any, config: DetectorConfig, *, weights_sha256: str, source: str) -> None:
        if model.task not in ("detect", "segment"):
            raise ValueError(f"ultralytics model task must be 'detect' or 'segment', got {model.task!r}.")
        self._model = model
        self._config = config
        self._class_names = coco_class_names()
        names = [model.names[i] for i in range(len(model.names))]
        if len(names) != len(self._class_names):
            raise ValueError(f"ultralytics model must have the 80 COCO classes, got {len(names)} classes.")
        # A model built from a YAML has placeholder names "0".."79"; trained weights carry their own.
        if not all(name.isdigit() for name in names):
            geneval_names(tuple(names))
        self._info = DetectorInfo(
            kind="ultralytics",
            description=f"{source} task={model.task} conf={config.conf} imgsz={config.imgsz} "
            f"max_det={config.max_det}",
            weights_sha256=weights_sha256,
            provides_color=False,
        )

    @classmethod
    def build(cls, config: DetectorConfig, *, tiny: bool = False) -> UltralyticsDetector:
        """Load ``config.weights`` (a file), or under ``tiny`` build a model YAML with seeded random
        weights."""
        weights = config.weights if config.weights is not None else (TINY_MODEL_YAML if tiny else None)
        if weights is None:
            raise ValueError("the ultralytics detector needs --detector-weights PATH (a YOLO .pt file).")
        is_yaml = weights.endswith(_YAML_SUFFIXES)
        if is_yaml and not tiny:
            raise ValueError(
                f"--detector-weights {weights} is a model YAML (random weights); use it with --tiny only."
            )
        if not is_yaml and tiny:
            raise ValueError(f"--tiny builds a model YAML with random weights, got weights file {weights}.")
        if not is_yaml and not Path(weights).is_file():
            # Ultralytics would try to download a missing name; the service never downloads.
            raise ValueError(f"--detector-weights must be an existing file, got {weights}.")
        YOLO = _import_ultralytics().YOLO
        if is_yaml:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = YOLO(weights)
            sha = f"tiny:{config.seed}"
        else:
            model = YOLO(weights)
            sha = file_sha256(weights)
        model.model.eval()
        return cls(model, config, weights_sha256=sha, source=Path(weights).name)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._class_names

    @property
    def info(self) -> DetectorInfo:
        return self._info

    def detect(self, images: Sequence[torch.Tensor]) -> list[Detections]:
        if not images:
            return []
        # Ultralytics reads numpy images as OpenCV does: HWC, BGR.
        bgr = [np.ascontiguousarray(image.permute(1, 2, 0).numpy()[..., ::-1]) for image in images]
        config = self._config
        results = self._model.predict(
            bgr,
            conf=config.conf,
            imgsz=config.imgsz,
            max_det=config.max_det,
            retina_masks=True,
            device=config.device,
            verbose=False,
        )
        return [self._convert(result, image.shape[1:]) for result, image in zip(results, images, strict=True)]

    def _convert(self, result: Any, size: tuple[int, int]) -> Detections:
        boxes = result.boxes
        xyxy = boxes.xyxy.cpu().double().numpy()
        scores = boxes.conf.cpu().double().numpy()
        labels = boxes.cls.cpu().long().numpy()
        masks = None if result.masks is None else result.masks.data.cpu().numpy().astype(bool)
        if masks is not None and masks.shape[1:] != tuple(size):
            raise RuntimeError(f"ultralytics returned masks of size {masks.shape[1:]} for an image of {size}")
        detections: Detections = {name: [] for name in self._class_names}
        for i, label in enumerate(labels.tolist()):
            detections[self._class_names[label]].append(
                Detection(
                    box=tuple(xyxy[i].tolist()),
                    score=float(scores[i]),
                    mask=None if masks is None else masks[i],
                )
            )
        return detections
