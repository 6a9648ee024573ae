"""Every servable scorer, by name. Imported lazily so serving one model never imports another's stack."""

from __future__ import annotations

import importlib
from typing import Protocol

from services.core.scorer import Scorer


class ScorerFactory(Protocol):
    def build(self, *, checkpoint: str | None, tiny: bool, device: str) -> Scorer: ...


SCORERS: dict[str, str] = {
    "compressibility": "services.compressibility:CompressibilityScorer",
}


def scorer_class(name: str) -> ScorerFactory:
    try:
        target = SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(sorted(SCORERS))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_scorer(
    name: str, *, checkpoint: str | None = None, tiny: bool = False, device: str = "cpu"
) -> Scorer:
    return scorer_class(name).build(checkpoint=checkpoint, tiny=tiny, device=device)
