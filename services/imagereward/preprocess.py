"""ImageReward's inputs: the image transform and the BLIP prompt tokenizer, exactly as upstream scores.

Image (upstream ``ImageReward._transform(224)``): PIL bicubic resize of the shorter side to 224 (the longer
side to ``int(224 · long / short)``), centre crop 224, ``ToTensor`` (/255), normalise with OpenAI CLIP
mean/std. The resize runs on a PIL image because upstream scores PIL images: a tensor bicubic resize would
round and filter differently.

Prompt (upstream ``BLIP init_tokenizer`` + ``ImageReward.score``): bert-base-uncased WordPiece with ``[DEC]``
added as bos token and ``[ENC]`` as an additional special token, ``padding='max_length', truncation=True,
max_length=35``. The ids are used as produced — ``[CLS]`` first. BLIP's image-text-matching head replaces
position 0 with ``[ENC]``, but ImageReward's ``score``/``inference_rank`` (what the reward is) do not, so
neither do we.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode
from transformers import BertTokenizer

IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PROMPT_TOKENS = 35
VOCAB_FILE = "vocab.txt"


def preprocess_image(image: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(3, H, W) uint8 RGB → (3, size, size) float32, normalised."""
    pil = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()))
    pil = TF.resize(pil, size, interpolation=InterpolationMode.BICUBIC)
    pil = TF.center_crop(pil, [size, size])
    return TF.normalize(TF.to_tensor(pil), CLIP_MEAN, CLIP_STD)


def load_tokenizer(directory: Path) -> BertTokenizer:
    """BLIP's tokenizer from a local directory holding bert-base-uncased's ``vocab.txt`` (never the hub).

    ``BertTokenizer.from_pretrained(dir)`` is used because in transformers 5 ``BertTokenizer(vocab_file=…)``
    silently drops the vocabulary and maps every word to ``[UNK]``.
    """
    if not (directory / VOCAB_FILE).is_file():
        raise ValueError(f"no {VOCAB_FILE} in {directory}; ImageReward needs bert-base-uncased's vocab.txt")
    tokenizer = BertTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def tokenize(tokenizer: BertTokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts → (input_ids, attention_mask), each (B, 35) int64, [CLS] first, padded with [PAD]."""
    encoded = tokenizer(
        list(prompts),
        padding="max_length",
        truncation=True,
        max_length=MAX_PROMPT_TOKENS,
        return_tensors="pt",
    )
    return encoded["input_ids"], encoded["attention_mask"]


TINY_WORDS = (
    "a an the of on in at to and with photo picture image painting drawing cat dog bird horse car bus "
    "tree house flower person man woman child red blue green yellow orange purple pink brown black white "
    "big small two three four left right above below next sky sea city street field night day sun moon"
)


def write_tiny_vocab(directory: Path) -> Path:
    """A small WordPiece vocabulary (specials, some words, single letters and ## continuations).

    For the tiny model only: real scoring needs bert-base-uncased's vocabulary, whose ids the checkpoint's
    embedding table is indexed by.
    """
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += sorted(set(TINY_WORDS.split())) + letters + digits + [f"##{c}" for c in letters + digits]
    tokens += [".", ",", "'", "-"]
    path = directory / VOCAB_FILE
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return path
