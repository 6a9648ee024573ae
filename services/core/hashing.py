"""sha256 of weight files, the fingerprint every scorer reports in ``ModelInfo.checkpoint_sha256``.

Torch-free, so the GenEval format package and the checkpoint resolvers can use it without the models.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, as ``sha256sum`` prints it (read in 1 MB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
