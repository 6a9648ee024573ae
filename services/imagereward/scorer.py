"""The ``imagereward`` scorer: one standardised ImageReward v1.0 value per (image, prompt)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import BertTokenizer

from services.core.hashing import file_sha256
from services.core.scorer import ModelIdentity, ScoreBatch, ScoreOutput, require_one_source
from services.imagereward.checkpoint import load_model, resolve_files
from services.imagereward.model import ImageRewardModel, build_tiny
from services.imagereward.preprocess import (
    IMAGE_SIZE,
    load_tokenizer,
    preprocess_image,
    tokenize,
    write_tiny_vocab,
)

TINY_SEED = 0
VERSION = "1"


class ImageRewardScorer:
    """Scores each image against its own prompt; no metadata, no groups."""

    def __init__(
        self,
        model: ImageRewardModel,
        tokenizer: BertTokenizer,
        *,
        checkpoint_sha256: str,
        device: str = "cpu",
    ) -> None:
        vocab_size = model.text_encoder.config.vocab_size
        if len(tokenizer) > vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} ids but the text encoder's table has {vocab_size}; "
                "use bert-base-uncased's vocab.txt with the ImageReward checkpoint"
            )
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self._identity = ModelIdentity(
            name="imagereward",
            version=VERSION,
            checkpoint_sha256=checkpoint_sha256,
            outputs=("imagereward",),
            preferred_size=(IMAGE_SIZE, IMAGE_SIZE),
        )

    @classmethod
    def build(
        cls, *, checkpoint: str | None = None, tiny: bool = False, device: str = "cpu"
    ) -> ImageRewardScorer:
        require_one_source(
            "imagereward",
            checkpoint,
            tiny,
            "a directory with ImageReward.pt, med_config.json and bert-base-uncased's vocab.txt",
        )
        if tiny:
            with tempfile.TemporaryDirectory() as scratch:
                write_tiny_vocab(Path(scratch))
                tokenizer = load_tokenizer(Path(scratch))
            model = build_tiny(len(tokenizer), TINY_SEED)
            return cls(model, tokenizer, checkpoint_sha256=f"tiny:{TINY_SEED}", device=device)
        files = resolve_files(checkpoint)
        return cls(
            load_model(files),
            load_tokenizer(files.vocab_dir),
            checkpoint_sha256=file_sha256(files.weights),
            device=device,
        )

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    def validate(self, prompt: str, metadata: Mapping[str, Any] | None) -> None:
        return None  # any prompt tokenizes (truncated at 35 tokens); metadata is not used

    def score(self, batch: ScoreBatch) -> ScoreOutput:
        pixels = torch.stack([preprocess_image(image) for image in batch.images]).to(self.device)
        input_ids, attention_mask = tokenize(self.tokenizer, batch.prompts)
        with torch.inference_mode():
            rewards = self.model(pixels, input_ids.to(self.device), attention_mask.to(self.device))
        return ScoreOutput(samples={"imagereward": rewards.double().cpu()})
