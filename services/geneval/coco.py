"""GenEval's COCO-80 vocabulary.

GenEval names the 80 COCO classes as COCO does except for three, which it spells out so that a prompt reads
naturally ("a photo of a tv remote", not "a photo of a remote"). Metadata uses GenEval's spelling, so every
COCO detector's output has to be renamed the same way before the rules see it.
"""

from __future__ import annotations

from typing import Final

COCO_TO_GENEVAL: Final[dict[str, str]] = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
}
"""COCO class name → GenEval class name, for the classes whose names differ."""

GENEVAL_CLASSES: Final[tuple[str, ...]] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
"""The 80 classes in COCO's contiguous label order (label i of a COCO-80 detector), GenEval names."""


def geneval_names(coco_names: tuple[str, ...]) -> tuple[str, ...]:
    """COCO-80 names in label order → GenEval names; raises if they are not the 80 COCO classes in order."""
    renamed = tuple(COCO_TO_GENEVAL.get(name, name) for name in coco_names)
    if renamed != GENEVAL_CLASSES:
        pairs = zip(renamed, GENEVAL_CLASSES, strict=False)  # a length mismatch is reported below
        wrong = [(i, got) for i, (got, want) in enumerate(pairs) if got != want]
        raise ValueError(
            f"detector class names must be the 80 COCO classes in label order, got {len(coco_names)} names "
            f"with mismatches (index, name) {wrong[:5]}."
        )
    return renamed
