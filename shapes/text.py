"""Text side of the shapes model: two tiny CLIP text encoders in SD3's roles, and the SD3 condition.

SD3 conditions its transformer on three text encoders: CLIP-L, OpenCLIP bigG ("CLIP-G") and T5-XXL. The
shapes model keeps the two CLIP roles with tiny ``CLIPTextModelWithProjection`` encoders over CLIP's real
49,408-token vocabulary and leaves T5 out, which diffusers' ``StableDiffusion3Pipeline`` allows
(``text_encoder_3=None`` fills the T5 slots with zeros). :func:`sd3_condition` builds the condition the way
that pipeline's ``encode_prompt`` does, so code written against the shapes model (e.g. the E2PO
perturbation of CLIP-L token embeddings) runs unchanged on SD3.5-M:

- ``prompt_embeds`` (B, L + t5_sequence_length, joint_attention_dim), L being the CLIP context length
  (SD3: 77): per token, [CLIP-L hidden_states[-2] ‖ CLIP-G hidden_states[-2]] zero-padded on the feature
  axis to ``joint_attention_dim``, followed along the sequence by ``t5_sequence_length`` all-zero T5 slots
  (0 by default: the zeros carry no information and only cost attention).
- ``pooled_projections`` (B, d_L + d_G): [CLIP-L text_embeds ‖ CLIP-G text_embeds], each taken at the first
  end-of-text token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

# The encoder config must name CLIP's real end-of-text id: with transformers' legacy default of 2,
# pooling silently falls back to the argmax of the ids.
from services.clip_shared.tokenizer import END_OF_TEXT_ID, START_OF_TEXT_ID, VOCAB_SIZE, clip_tokenizer

SD3_MAX_LENGTH = 77
"""CLIP's context length; SD3 pads every prompt to it."""

CLIP_G_PAD_TOKEN = "!"
"""SD3's CLIP-G tokenizer pads with "!" (id 0) while its CLIP-L tokenizer pads with end-of-text; the shapes
tokenizers do the same so the two roles see the inputs they see in SD3."""


@dataclass(kw_only=True)
class ClipTextConfig:
    """Size of one tiny CLIP text encoder."""

    hidden_size: int = 32
    """Token width. SD3.5-M: 768 (CLIP-L), 1280 (CLIP-G). Kept tiny because the 49,408-row token table
    dominates the parameter count."""
    num_layers: int = 2
    """Transformer layers. SD3 reads hidden_states[-2] (the penultimate layer), so with 2 layers the prompt
    tokens come from layer 1 and the last layer only feeds the pooled embedding, as in SD3."""
    num_heads: int = 2
    """Attention heads; must divide ``hidden_size``."""
    intermediate_size: int = 64
    """MLP width (CLIP uses 4× hidden; 2× suffices for a 16-word vocabulary)."""
    projection_dim: int = 32
    """Width of ``text_embeds`` (the pooled projection). SD3.5-M: equal to the hidden size (768, 1280)."""
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    """Activation: OpenAI's CLIP-L uses quick_gelu, OpenCLIP bigG uses gelu."""
    max_length: int = SD3_MAX_LENGTH
    """Context length: position embeddings, and the length the tokenizer pads every prompt to."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size must be divisible by num_heads, got {self.hidden_size} and {self.num_heads}."
            )
        for name in ("hidden_size", "num_layers", "intermediate_size", "projection_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClipTextConfig.{name} must be >= 1, got {getattr(self, name)}.")

    def to_transformers(self) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            projection_dim=self.projection_dim,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_length,
            hidden_act=self.hidden_act,
            bos_token_id=START_OF_TEXT_ID,
            eos_token_id=END_OF_TEXT_ID,
            pad_token_id=END_OF_TEXT_ID,
        )


def build_clip_text_encoder(config: ClipTextConfig, seed: int) -> CLIPTextModelWithProjection:
    """A randomly initialised encoder, deterministic in ``seed`` (the global torch RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(config.to_transformers()).eval()


def clip_tokenizers(max_length: int = SD3_MAX_LENGTH) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """The (CLIP-L role, CLIP-G role) tokenizers: CLIP's vocabulary, padding as in SD3."""
    return clip_tokenizer(model_max_length=max_length), clip_tokenizer(
        model_max_length=max_length, pad_token=CLIP_G_PAD_TOKEN
    )


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(B, L) int64 ids, padded and truncated to the tokenizer's ``model_max_length`` L as SD3's pipeline
    does."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def clip_features(
    encoder: CLIPTextModelWithProjection, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's two readings of one CLIP encoder: hidden_states[-2] (B, L, d) and text_embeds (B, proj_dim).

    No attention mask is passed, as in SD3: padding tokens are attended to (causally) like any token.
    """
    out = encoder(ids.to(encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def sd3_condition(
    clip_l: tuple[torch.Tensor, torch.Tensor],
    clip_g: tuple[torch.Tensor, torch.Tensor],
    *,
    joint_attention_dim: int,
    t5_sequence_length: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assemble (prompt_embeds, pooled_projections) from the two encoders' :func:`clip_features`.

    Shapes: prompt_embeds (B, L + t5_sequence_length, joint_attention_dim), pooled (B, p_L + p_G).
    """
    (hidden_l, pooled_l), (hidden_g, pooled_g) = clip_l, clip_g
    clip_tokens = torch.cat([hidden_l, hidden_g], dim=-1)
    width = clip_tokens.shape[-1]
    if width > joint_attention_dim:
        raise ValueError(
            f"joint_attention_dim must be >= the CLIP-L + CLIP-G width {width}, got {joint_attention_dim}."
        )
    clip_tokens = torch.nn.functional.pad(clip_tokens, (0, joint_attention_dim - width))
    t5_slots = clip_tokens.new_zeros(clip_tokens.shape[0], t5_sequence_length, joint_attention_dim)
    prompt_embeds = torch.cat([clip_tokens, t5_slots], dim=1)
    pooled = torch.cat([pooled_l, pooled_g], dim=-1)
    return prompt_embeds, pooled
