"""Build ``<scorer>.mar`` with torch-model-archiver and write the matching ``config.properties``.

An archive holds the generic handler and ``scorer.json``; the scorer's code comes from the installed
``e2po`` package (the same code the gRPC server runs) and real weights stay on the serving host's disk
(``checkpoint``), because TorchServe unpacks every archive on each start and multi-GB archives would
make that slow.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from services.torchserve.config import ServerSettings, render_properties
from services.torchserve.spec import SPEC_FILE, ArchiveSpec

HANDLER_FILE = Path(__file__).with_name("handler.py")
ARCHIVE_VERSION = "1.0"


def build_archive(spec: ArchiveSpec, out_dir: Path) -> Path:
    """Write ``out_dir/<scorer>.mar`` (replacing an older one) and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        spec_path = Path(scratch) / SPEC_FILE
        spec_path.write_text(spec.to_json())
        command = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            spec.scorer,
            "--version",
            ARCHIVE_VERSION,
            "--handler",
            str(HANDLER_FILE),
            "--extra-files",
            str(spec_path),
            "--export-path",
            str(out_dir),
            "--force",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed ({done.returncode}): {done.stderr.strip()}")
    return out_dir / f"{spec.scorer}.mar"


def write_properties(model_store: Path, settings: ServerSettings, path: Path | None = None) -> Path:
    """(Re)write ``config.properties`` serving every archive in ``model_store``."""
    specs = [ArchiveSpec.from_archive(mar) for mar in sorted(model_store.glob("*.mar"))]
    path = path or model_store / "config.properties"
    path.write_text(render_properties(model_store.resolve(), specs, settings))
    return path
