"""Deterministic construction of tiny models (tests, the CPU demo)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

TINY_SEED = 0
"""Seed of every tiny model; the identity records it as ``tiny:<seed>``."""


@contextlib.contextmanager
def seeded(seed: int = TINY_SEED) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
