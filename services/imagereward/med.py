"""BLIP's "med" text encoder: BERT-base whose every layer also cross-attends to the image tokens.

Architecture as published with BLIP (``models/med.py``, a BERT variant) in the mode ImageReward scores with
(``mode='multimodal'``, not a decoder): per layer, bidirectional self-attention over the prompt tokens, then
cross-attention whose queries are the text states and whose keys/values are projections of the ViT's output
tokens (``encoder_width`` = the ViT width, 1024 for ViT-L), then the feed-forward block; all post-norm as in
BERT.
Embeddings are word + absolute position only (no token-type table). Parameter names follow the upstream
checkpoint so that ``blip.text_encoder.*`` loads with strict key matching.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MASKED_SCORE = -10000.0
"""Additive attention score for padding positions, as BERT of the transformers 4.15 era (BLIP's base) used."""


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """Shape of the text encoder; the real values come from ImageReward's ``med_config.json``."""

    vocab_size: int = 30524
    """bert-base-uncased's 30522 word pieces + BLIP's added ``[DEC]`` and ``[ENC]``."""
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    encoder_width: int = 1024
    """Width of the image tokens the cross-attention reads (BLIP replaces the json's value by the ViT's)."""

    @classmethod
    def from_med_config(cls, med: Mapping[str, Any], *, encoder_width: int) -> TextConfig:
        """Read a BLIP ``med_config.json`` (a BertConfig), refusing settings this encoder lacks."""
        if med.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"med_config hidden_act must be 'gelu', got {med['hidden_act']!r}")
        if med.get("position_embedding_type", "absolute") != "absolute":
            got = med["position_embedding_type"]
            raise ValueError(f"med_config position_embedding_type must be 'absolute', got {got!r}")
        if not med.get("add_cross_attention", False):
            raise ValueError(
                "med_config must have add_cross_attention: true (ImageReward scores cross-modally)"
            )
        return cls(
            vocab_size=int(med["vocab_size"]),
            hidden_size=int(med["hidden_size"]),
            num_layers=int(med["num_hidden_layers"]),
            num_heads=int(med["num_attention_heads"]),
            intermediate_size=int(med["intermediate_size"]),
            max_position_embeddings=int(med["max_position_embeddings"]),
            layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(med.get("pad_token_id", 0)),
            encoder_width=encoder_width,
        )


class Embeddings(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class SelfAttention(nn.Module):
    """Queries from the text; keys/values from the text (self) or from ``kv_width``-wide image tokens."""

    def __init__(self, config: TextConfig, *, kv_width: int) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.view(batch, tokens, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(
        self, hidden: torch.Tensor, context: torch.Tensor, score_bias: torch.Tensor | None
    ) -> torch.Tensor:
        q, k, v = (
            self._heads(self.query(hidden)),
            self._heads(self.key(context)),
            self._heads(self.value(context)),
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=score_bias)
        return out.transpose(1, 2).flatten(2)


class SelfOutput(nn.Module):
    """Post-norm residual after an attention: LayerNorm(dense(attended) + input)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(attended) + residual)


class AttentionBlock(nn.Module):
    def __init__(self, config: TextConfig, *, kv_width: int) -> None:
        super().__init__()
        self.self = SelfAttention(config, kv_width=kv_width)
        self.output = SelfOutput(config)

    def forward(
        self, hidden: torch.Tensor, context: torch.Tensor, score_bias: torch.Tensor | None
    ) -> torch.Tensor:
        return self.output(self.self(hidden, context, score_bias), hidden)


class Intermediate(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden))


class Output(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, expanded: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(expanded) + residual)


class Layer(nn.Module):
    """Self-attention → cross-attention to the image → feed-forward."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.attention = AttentionBlock(config, kv_width=config.hidden_size)
        self.crossattention = AttentionBlock(config, kv_width=config.encoder_width)
        self.intermediate = Intermediate(config)
        self.output = Output(config)

    def forward(self, hidden: torch.Tensor, text_bias: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden, hidden, text_bias)
        # Every image token is attended to (ImageReward passes an all-ones image mask), so no bias here.
        hidden = self.crossattention(hidden, image, None)
        return self.output(self.intermediate(hidden), hidden)


class Encoder(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_layers))


class MedTextEncoder(nn.Module):
    """(input_ids (B, L), attention_mask (B, L), image tokens (B, T, encoder_width)) → (B, L, hidden)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        limit = self.config.max_position_embeddings
        if input_ids.shape[1] > limit:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed max_position_embeddings={limit}")
        hidden = self.embeddings(input_ids)
        keep = attention_mask[:, None, None, :].to(hidden.dtype)
        text_bias = (1.0 - keep) * MASKED_SCORE
        for layer in self.encoder.layer:
            hidden = layer(hidden, text_bias, image_embeds)
        return hidden
