"""services.registry.import_all, which the image build runs in its runtime stage (where libGL is absent)
to fail the build instead of a pod: it imports every scorer and the detectors' OpenCV."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_all_imports_every_scorer_and_opencv() -> None:
    expected = [
        "cv2",
        "ultralytics",
        "services.geneval.detectors.yolo",
        "services.geneval.scorer",
        "services.pickscore",
        "services.hps",
        "services.aesthetic",
        "services.imagereward",
        "services.dino",
        "services.compressibility",
    ]
    code = (
        "import sys, services.registry as r; r.import_all();"
        f"missing = [m for m in {expected} if m not in sys.modules];"
        "assert not missing, missing"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
