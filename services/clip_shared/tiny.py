"""Deterministic construction of tiny models (tests, the CPU demo)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from transformers import CLIPConfig

from services.clip_shared.tokenizer import END_OF_TEXT_ID, START_OF_TEXT_ID, VOCAB_SIZE
from services.clip_shared.transforms import IMAGE_SIZE

TINY_SEED = 0
"""Seed of every tiny model; the identity records it as ``tiny:<seed>``."""


@contextlib.contextmanager
def seeded(seed: int = TINY_SEED) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def tiny_clip_config(
    *, projection_dim: int, text_layers: int = 1, vision: Mapping[str, int] = TINY_VISION
) -> CLIPConfig:
    """A small CLIP with CLIP's real vocabulary and token ids, a 32-wide text tower of ``text_layers``
    layers and a 224² image tower of patch 32 laid out as ``vision``.

    ``eos_token_id`` must be the real end-of-text id: with the legacy value 2, transformers pools the
    text at ``argmax(input_ids)`` instead of at the first end-of-text token.
    """
    return CLIPConfig(
        text_config={
            "vocab_size": VOCAB_SIZE,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": START_OF_TEXT_ID,
            "eos_token_id": END_OF_TEXT_ID,
            "pad_token_id": END_OF_TEXT_ID,
        },
        vision_config={**vision, "image_size": IMAGE_SIZE, "patch_size": 32},
        projection_dim=projection_dim,
    )
