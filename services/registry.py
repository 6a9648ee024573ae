"""Every servable scorer, by name. Imported lazily so serving one model never imports another's stack."""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from services.core.scorer import Scorer


class ScorerFactory(Protocol):
    """A scorer class. ``options`` are its own command-line options, declared by an optional
    ``add_arguments(parser)`` static method that ``services.serve`` calls for the chosen scorer only."""

    def build(self, *, checkpoint: str | None, tiny: bool, device: str, **options: Any) -> Scorer: ...


SCORERS: dict[str, str] = {
    "compressibility": "services.compressibility:CompressibilityScorer",
    "imagereward": "services.imagereward:ImageRewardScorer",
    "dino": "services.dino:DinoScorer",
    "geneval": "services.geneval.scorer:GenEvalScorer",
    "pickscore": "services.pickscore:PickScoreScorer",
    "hps": "services.hps:HPSScorer",
    "aesthetic": "services.aesthetic:AestheticScorer",
}


def scorer_class(name: str) -> ScorerFactory:
    try:
        target = SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(sorted(SCORERS))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_scorer(
    name: str, *, checkpoint: str | None = None, tiny: bool = False, device: str = "cpu", **options: Any
) -> Scorer:
    # Options are passed only when given, so scorers without options keep a three-keyword build().
    return scorer_class(name).build(checkpoint=checkpoint, tiny=tiny, device=device, **options)


def import_all() -> None:
    """Import every scorer's modules, the GenEval detectors' included (ultralytics, hence OpenCV): the
    image build runs this in the runtime stage, so a system library it lacks fails the build, not a pod."""
    for name in SCORERS:
        scorer_class(name)
    coco_class_names = importlib.import_module("services.geneval.detectors.yolo").coco_class_names
    coco_class_names()  # imports ultralytics offline, as the detector does, and with it OpenCV
