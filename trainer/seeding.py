"""Random numbers keyed by what they are for, so that a run does not depend on how its work is split.

Every random draw of the algorithm — a prompt's rollout noises, its initial perturbations, a sample's
training timesteps and noise — comes from a CPU generator seeded by (run seed, purpose, iteration, global
index). The same prompt therefore gets the same numbers on one process or on eight, in any chunking, and
after a resume, with no generator state to save: 2-process DDP computes what 1 process computes, up to
the order of floating-point sums. CPU generators keep the numbers independent of the device.
"""

from __future__ import annotations

import hashlib

import torch


def keyed_seed(seed: int, *key: int | str) -> int:
    """A 63-bit seed from ``seed`` and ``key`` (blake2b of their repr: stable across runs and platforms)."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def keyed_generator(seed: int, *key: int | str) -> torch.Generator:
    """A fresh CPU generator for the draws named by ``key``."""
    return torch.Generator().manual_seed(keyed_seed(seed, *key))
