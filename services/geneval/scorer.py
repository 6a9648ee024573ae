"""The GenEval reward as a servable scorer: detector → colour (when the detector has none) → rules.

Per sample it answers (all floats, in this order):

- ``geneval/score``: flow_grpo's partial-credit reward, the RL training signal (may be negative);
- ``geneval/strict``: 1.0 when every include clause matched exactly, else 0.0;
- ``geneval/correct``: original GenEval correctness, 1.0 or 0.0 — the evaluation metric;
- ``geneval/tag/<tag>``: one-hot of the record's tag over the six GenEval tags, so the per-tag accuracy and
  the overall GenEval score (mean over tags) follow from a response alone:
  ``acc[t] = Σ correct·tag_t / Σ tag_t``, ``GenEval = mean_t acc[t]``.

Metadata is required and checked before queueing (``validate``): an unknown class for the detector, count < 1,
a position referring to no earlier clause or malformed JSON are INVALID_ARGUMENT naming the field. The rules
read only the metadata: its ``prompt`` may differ from the sample's prompt (e.g. a paraphrase was rendered)
and is not compared.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from services.core.flags import ArgumentAdder
from services.core.scorer import ModelIdentity, ScoreBatch, ScoreOutput
from services.geneval.color import ColorClassifier
from services.geneval.detectors import DETECTORS, Detections, Detector, DetectorConfig, build_detector
from services.geneval.metadata import TAGS, Metadata, parse_metadata
from services.geneval.rules import RuleConfig, evaluate, filter_detections, score_threshold
from services.geneval.weights import combined_sha256

log = logging.getLogger(__name__)

VERSION = "1"
"""Bump whenever the same images and metadata can score differently (rules, crop, outputs)."""

OUTPUTS: tuple[str, ...] = (
    "geneval/score",
    "geneval/strict",
    "geneval/correct",
    *(f"geneval/tag/{tag}" for tag in TAGS),
)

_HEX64 = re.compile(r"[0-9a-f]{64}")


class GenEvalScorer:
    """GenEval over any :class:`Detector`; needs a colour classifier unless the detector gives colours."""

    def __init__(
        self, detector: Detector, *, rules: RuleConfig | None = None, color: ColorClassifier | None = None
    ) -> None:
        info = detector.info
        if color is None and not info.provides_color:
            raise ValueError(f"detector {info.kind!r} gives no colours; a colour classifier is required.")
        self.detector = detector
        self.rules = rules or RuleConfig()
        # A detector that knows colours is authoritative; CLIP would only add noise and time.
        self.color = None if info.provides_color else color
        self._classes = frozenset(detector.class_names)
        self._identity = ModelIdentity(
            name="geneval",
            version=self._version(),
            checkpoint_sha256=self._checkpoint_sha256(),
            outputs=OUTPUTS,
            requires_metadata=True,
        )

    @classmethod
    def build(
        cls,
        *,
        checkpoint: str | None = None,
        tiny: bool = False,
        device: str = "cpu",
        detector: str = "shapes",
        detector_weights: str | None = None,
        detector_conf: float = DetectorConfig.conf,
        detector_imgsz: int = DetectorConfig.imgsz,
        clip_checkpoint: str | None = None,
        color_batch_size: int = 32,
        score_threshold: float = RuleConfig.score_threshold,
        counting_score_threshold: float = RuleConfig.counting_score_threshold,
        max_per_class: int = RuleConfig.max_per_class,
        position_margin: float = RuleConfig.position_margin,
        position_cutoff: float = RuleConfig.position_cutoff,
        extra_position_credit: bool = RuleConfig.extra_position_credit,
    ) -> GenEvalScorer:
        """Build from command-line options (see :meth:`add_arguments` for their meaning)."""
        if checkpoint is not None:
            raise ValueError(
                "geneval takes --detector-weights and --clip-checkpoint, not --checkpoint; drop --checkpoint."
            )
        rules = RuleConfig(
            score_threshold=score_threshold,
            counting_score_threshold=counting_score_threshold,
            max_per_class=max_per_class,
            position_margin=position_margin,
            position_cutoff=position_cutoff,
            extra_position_credit=extra_position_credit,
        )
        lowest = min(rules.score_threshold, rules.counting_score_threshold)
        if detector_conf > lowest:
            raise ValueError(
                f"--detector-conf must be <= the lowest rule threshold {lowest} so the rules see every box "
                f"they would keep, got {detector_conf}."
            )
        det = build_detector(
            detector,
            DetectorConfig(weights=detector_weights, conf=detector_conf, imgsz=detector_imgsz, device=device),
            tiny=tiny,
        )
        color = None
        if det.info.provides_color:
            if clip_checkpoint is not None:
                log.warning("the %s detector reports colours; ignoring --clip-checkpoint", detector)
        elif tiny:
            if clip_checkpoint is not None:
                raise ValueError("--tiny builds a tiny CLIP; drop --clip-checkpoint or --tiny.")
            color = ColorClassifier.tiny(device=device, batch_size=color_batch_size)
        elif clip_checkpoint is None:
            raise ValueError(f"the {detector} detector needs --clip-checkpoint PATH (CLIP ViT-L/14, OpenAI).")
        else:
            color = ColorClassifier.from_checkpoint(
                clip_checkpoint, device=device, batch_size=color_batch_size
            )
        scorer = cls(det, rules=rules, color=color)
        log.info("geneval %s; checkpoint %s", scorer.identity.version, scorer.identity.checkpoint_sha256)
        return scorer

    @staticmethod
    def add_arguments(parser: ArgumentAdder) -> None:
        """Command-line options of :meth:`build` (``python -m services.serve geneval ...``)."""
        parser.add_argument("--detector", choices=sorted(DETECTORS), default="shapes", help="object detector")
        parser.add_argument(
            "--detector-weights",
            help="ultralytics: YOLO detect/-seg .pt file (COCO-80); with --tiny a model YAML "
            "(default yolo11n-seg.yaml, random weights)",
        )
        parser.add_argument(
            "--detector-conf",
            type=float,
            default=DetectorConfig.conf,
            help="confidence passed to the detector; must be <= the rule thresholds (default %(default)s)",
        )
        parser.add_argument(
            "--detector-imgsz", type=int, default=DetectorConfig.imgsz, help="detector inference size"
        )
        parser.add_argument(
            "--clip-checkpoint", help="CLIP ViT-L/14 (OpenAI) weights for the colour classifier"
        )
        parser.add_argument("--color-batch-size", type=int, default=32, help="object crops per CLIP batch")
        parser.add_argument("--score-threshold", type=float, default=RuleConfig.score_threshold)
        parser.add_argument(
            "--counting-score-threshold", type=float, default=RuleConfig.counting_score_threshold
        )
        parser.add_argument("--max-per-class", type=int, default=RuleConfig.max_per_class)
        parser.add_argument("--position-margin", type=float, default=RuleConfig.position_margin)
        parser.add_argument("--position-cutoff", type=float, default=RuleConfig.position_cutoff)
        parser.add_argument(
            "--extra-position-credit",
            action="store_true",
            help="reproduce flow_grpo's extra 1.0 after a failed position check (off by default)",
        )

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    def validate(self, prompt: str, metadata: Mapping[str, Any] | None) -> None:
        if metadata is None:
            raise ValueError("metadata is required: a GenEval record with tag and include clauses.")
        parse_metadata(metadata, known_classes=self._classes)

    def score(self, batch: ScoreBatch) -> ScoreOutput:
        records = [parse_metadata(m or {}, known_classes=self._classes) for m in batch.metadata]
        raw = self.detector.detect(batch.images)
        kept = [
            filter_detections(
                detections,
                threshold=score_threshold(record.tag, self.rules),
                max_per_class=self.rules.max_per_class,
            )
            for record, detections in zip(records, raw, strict=True)
        ]
        if self.color is not None:
            self._classify_colors(self.color, batch.images, records, kept)
        results = [evaluate(record, dets, self.rules) for record, dets in zip(records, kept, strict=True)]
        samples = {
            "geneval/score": [r.score for r in results],
            "geneval/strict": [float(r.strict) for r in results],
            "geneval/correct": [float(r.correct) for r in results],
        }
        for tag in TAGS:
            samples[f"geneval/tag/{tag}"] = [float(r.tag == tag) for r in results]
        return ScoreOutput(samples={k: torch.tensor(v, dtype=torch.float64) for k, v in samples.items()})

    @staticmethod
    def _classify_colors(
        color: ColorClassifier,
        images: Sequence[torch.Tensor],
        records: Sequence[Metadata],
        kept: list[Detections],
    ) -> None:
        """Fill ``Detection.color`` where a colour clause will read it, all crops of the batch in one pass.

        Both rule sets read colours of at most the top-``count`` detections of a colour clause's class
        (the partial credit only when exactly ``count`` were found), so only those are cropped.
        """
        jobs: list[tuple[int, str, int]] = []
        items = []
        for i, record in enumerate(records):
            needed: dict[str, int] = {}
            for clause in record.include:
                if clause.color is not None:
                    needed[clause.cls] = max(needed.get(clause.cls, 0), clause.count)
            if not needed:
                continue
            image = np.ascontiguousarray(images[i].permute(1, 2, 0).numpy())
            for cls_name, count in needed.items():
                for j, det in enumerate(kept[i].get(cls_name, [])[:count]):
                    if det.color is None:
                        jobs.append((i, cls_name, j))
                        items.append((image, cls_name, det))
        if not items:
            return
        for (i, cls_name, j), name in zip(jobs, color.classify(items), strict=True):
            kept[i][cls_name][j] = replace(kept[i][cls_name][j], color=name)

    def _version(self) -> str:
        info, r = self.detector.info, self.rules
        color = "detector" if self.color is None else self.color.description
        return (
            f"{VERSION} detector={info.kind}({info.description}) color={color} "
            f"rules(score>{r.score_threshold} counting>{r.counting_score_threshold} "
            f"max_per_class={r.max_per_class} margin={r.position_margin} cutoff={r.position_cutoff} "
            f"extra_position_credit={'on' if r.extra_position_credit else 'off'})"
        )

    def _checkpoint_sha256(self) -> str:
        hashes = [self.detector.info.weights_sha256]
        if self.color is not None:
            hashes.append(self.color.weights_sha256)
        if len(hashes) == 1 or len(set(hashes)) == 1:
            return hashes[0]
        if all(_HEX64.fullmatch(h) for h in hashes):
            return combined_sha256(hashes)
        return "+".join(hashes)
