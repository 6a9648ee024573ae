"""The offline CLIP tokenizer gives exactly open_clip's ids."""

from __future__ import annotations

import open_clip
import pytest

from services.clip_shared.tokenizer import END_OF_TEXT, VOCAB_SIZE, clip_tokenizer

PROMPTS = [
    "a photo of a red circle",
    "A Photo of THREE Squares, left of a dog!",
    "an orange-colored cross; it's (big) & 2 cats...",
    "héllo wörld 123",
    "  spaces   and\ttabs ",
    "a photo of a purple sandwich right of a cow",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_open_clip(prompt: str) -> None:
    ours = clip_tokenizer()
    reference = open_clip.get_tokenizer("ViT-L-14")
    expected = reference([prompt])[0].tolist()
    end = expected.index(49407) + 1
    got = ours(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert got[:end] == expected[:end]
    assert len(got) == 77 and set(got[end:]) <= {ours.convert_tokens_to_ids(END_OF_TEXT)}


def test_vocabulary_and_special_tokens() -> None:
    tok = clip_tokenizer()
    assert len(tok) == VOCAB_SIZE
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    assert tok.model_max_length == 77
