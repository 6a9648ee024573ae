"""GenEval compositional reward served with a pluggable detector. Modules, one idea each:

- ``metadata``: parse and validate a GenEval record (field-naming ValueErrors).
- ``rules``: the pure rule engine — detections to partial-credit score, strict match, GenEval correctness.
- ``detectors``: the ``Detector`` protocol and registry (``shapes``, ``ultralytics``).
- ``color``: CLIP zero-shot colour of a detected object (mask composited on grey, box crop).
- ``scorer``: ``GenEvalScorer``, the servable scorer (``python -m services.serve geneval``).
- ``prompts``: GenEval-format COCO prompt generator and metadata JSONL reader (CLI).
- ``coco``: GenEval's spelling of the COCO-80 classes; ``weights``: weight-file hashes.

Importing the package imports none of torch, open_clip or ultralytics; the scorer loads them on build.
"""
