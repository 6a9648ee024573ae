"""The shapes-world vocabulary: colours, shape classes, counts, relations and GenEval tags, defined once.

Colour names are GenEval's ten colour-classifier names, so shapes-world metadata is valid GenEval metadata.
The RGB values are chosen for separability, not for looking canonical: every pair of palette entries
(background included) is at least 127 apart in RGB (orange–yellow and red–orange are the closest pairs), which
lets the detector assign a pixel to a colour with a distance threshold below half that gap and never be
ambiguous.
"""

from __future__ import annotations

from typing import Final

from services.geneval import metadata as geneval_metadata

COLORS: Final[dict[str, tuple[int, int, int]]] = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 192, 0),
    "blue": (0, 0, 255),
    "purple": (144, 0, 208),
    "pink": (255, 128, 208),
    "brown": (128, 64, 0),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
"""Colour name → RGB, in GenEval's colour-classifier order."""

COLOR_NAMES: Final[tuple[str, ...]] = tuple(COLORS)

BACKGROUND_RGB: Final[tuple[int, int, int]] = (128, 128, 128)
"""Mid grey: a neutral that keeps both black and white usable as object colours (a white or black background
would have to drop one of GenEval's colours) and stays at least 143 from every palette colour (closest:
brown)."""

CLASSES: Final[tuple[str, ...]] = ("circle", "square", "triangle")
"""Shape classes, distinguishable by mask shape down to ``shapes.scene.MIN_OBJECT_SIZE`` px (see
``shapes.raster``).

An earlier world also had a cross. Priors pretrained with it almost never drew one at 32 px (a cross alone in
1 of 20 held-out images) and confused the other classes more, so a quarter of every tag's prompts was
out of reach for the prior and for RL alike; docs/shapes.md has the measurements."""

COUNTS: Final[tuple[int, ...]] = (1, 2, 3, 4)
"""Object counts a clause may ask for; 1 is the single-object case."""

COUNTING_COUNTS: Final[tuple[int, ...]] = (2, 3, 4)
"""Counts used by the ``counting`` tag, as in GenEval (one object is the ``single_object`` tag's job)."""

# GenEval's relations (y grows downwards, so "above" means a smaller centre y) and its six tags in its
# reporting order: defined once, by the GenEval format package.
RELATIONS: Final[tuple[str, ...]] = geneval_metadata.RELATIONS
TAGS: Final[tuple[str, ...]] = geneval_metadata.TAGS
