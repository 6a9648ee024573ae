"""PickScore's model and tokenizer: the real checkpoint (hub id or local directory) or a tiny seeded one.

Real: ``CLIPModel`` from ``yuvalkirstain/PickScore_v1`` (a ViT-H/14 CLIP fine-tuned on Pick-a-Pic) with the
tokenizer of its processor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` — the pair PickScore's own inference
example loads. A local directory may hold both: the model's ``config.json`` + weights and the processor's
tokenizer files (see docs/scorers.md). Tiny: a ``CLIPModel`` of the same class from a small config, with the
real CLIP BPE vocabulary, so everything after construction is the same code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, PreTrainedTokenizerBase

from services.clip_shared.tiny import TINY_SEED, seeded, tiny_clip_config
from services.clip_shared.tokenizer import (
    END_OF_TEXT,
    END_OF_TEXT_ID,
    START_OF_TEXT,
    START_OF_TEXT_ID,
    VOCAB_SIZE,
    clip_tokenizer,
)
from services.clip_shared.transforms import check_center_crop_config
from services.clip_shared.weights import hf_weight_files, resolve_hf_dir, weights_sha256

log = logging.getLogger(__name__)

MODEL_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
"""Either set is a complete CLIP tokenizer (the processor repository ships both)."""
PREPROCESSOR_CONFIG = "preprocessor_config.json"
MAX_TOKENS = 77


@dataclass(kw_only=True)
class PickScoreCheckpoint:
    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase
    sha256: str
    """sha256 of the loaded weight file(s), or ``tiny:<seed>``."""


def tiny_config() -> CLIPConfig:
    """A 2-layer, 32-wide CLIP at PickScore's 224² input, with CLIP's real 49408-token vocabulary.

    ``eos_token_id`` must be the real end-of-text id: with the legacy value 2, transformers pools the text at
    ``argmax(input_ids)`` instead of at the first end-of-text token.
    """
    return tiny_clip_config(projection_dim=16, text_layers=2)


def build_tiny(seed: int = TINY_SEED) -> PickScoreCheckpoint:
    with seeded(seed):
        model = CLIPModel(tiny_config())
    return PickScoreCheckpoint(
        model=model, tokenizer=clip_tokenizer(model_max_length=MAX_TOKENS), sha256=f"tiny:{seed}"
    )


def load(checkpoint: str) -> PickScoreCheckpoint:
    """Load ``checkpoint`` (hub id or directory); the tokenizer comes from the same directory when it holds
    ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``, otherwise from the processor repository."""
    model_dir = resolve_hf_dir(checkpoint)
    weights = hf_weight_files(model_dir)
    # transformers 5 keeps the stored dtype by default; the scores are defined in float32
    model = CLIPModel.from_pretrained(model_dir, dtype=torch.float32)
    if any(all((model_dir / name).is_file() for name in names) for names in TOKENIZER_FILES):
        processor_dir = model_dir
    else:
        log.info("no tokenizer files in %s; using the processor %s", model_dir, PROCESSOR_ID)
        processor_dir = resolve_hf_dir(PROCESSOR_ID, with_weights=False)
    _check_processor(processor_dir)
    tokenizer = CLIPTokenizer.from_pretrained(processor_dir, model_max_length=MAX_TOKENS)
    _check_tokenizer(tokenizer, processor_dir)
    return PickScoreCheckpoint(model=model, tokenizer=tokenizer, sha256=weights_sha256(weights))


def _check_processor(directory: Path) -> None:
    path = directory / PREPROCESSOR_CONFIG
    if path.is_file():
        check_center_crop_config(json.loads(path.read_text(encoding="utf-8")), source=str(path))


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """The model was trained on CLIP's BPE ids; a different vocabulary would score silently wrong."""
    ids = tokenizer.convert_tokens_to_ids([START_OF_TEXT, END_OF_TEXT])
    if len(tokenizer) != VOCAB_SIZE or ids != [START_OF_TEXT_ID, END_OF_TEXT_ID]:
        raise ValueError(
            f"tokenizer in {directory} is not CLIP's BPE: {len(tokenizer)} tokens, start/end ids {ids}, "
            f"expected {VOCAB_SIZE} tokens and [{START_OF_TEXT_ID}, {END_OF_TEXT_ID}]"
        )
