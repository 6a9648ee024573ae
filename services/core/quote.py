"""Values quoted in error messages, bounded: a caller's 60 KB field echoed whole would push the status
details past gRPC's trailer limit, and the caller would see RESOURCE_EXHAUSTED instead of the
server's INVALID_ARGUMENT (and retry it). Torch-free: the GenEval format package uses it too."""

from __future__ import annotations

from typing import Any

MAX_QUOTE_CHARS = 100
"""Most characters of a value quoted in an error sentence."""
MAX_DETAIL_CHARS = 2000
"""Most characters of a whole error sentence (gRPC's default trailer limit is 8 KB)."""


def quote(value: Any, limit: int = MAX_QUOTE_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters with the length of what was left out."""
    text = repr(value)
    return clip(text, limit)


def clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """``text`` itself if short enough, else its start and ``… (N more chars)``."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more chars)"
