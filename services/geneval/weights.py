"""Hashes of weight files, so Describe names exactly which detector and CLIP weights a reward came from."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def combined_sha256(hex_digests: Sequence[str]) -> str:
    """One hash for several weight files: sha256 of their hex digests, one per line.

    Reproducible from a shell without rereading anything twice:
    ``(sha256sum a | cut -c1-64; sha256sum b | cut -c1-64) | sha256sum``.
    """
    return hashlib.sha256("".join(f"{h}\n" for h in hex_digests).encode()).hexdigest()
