"""Stable Diffusion 3.5 Medium's pipeline at random init, full size or shrunk, without any download.

Every component is the class ``stabilityai/stable-diffusion-3.5-medium``'s ``model_index.json`` names, with
the configs in ``bench/configs/`` (copied from the hub repository's sub-folder configs). ``tiny_configs``
keeps every structural feature — T5 after the two CLIPs, a 16-channel factor-8 VAE with SD3.5's scaling
and shift, dual-attention blocks with RMS q/k norm, scheduler shift 3.0 — and shrinks only widths and
depths, so CPU tests and the GPU benchmark run the same code. Tokenizers are built offline: CLIP's real
BPE vocabulary, and transformers' T5 tokenizer class over a small Unigram vocabulary with T5's special
ids (the real SentencePiece model cannot be downloaded; token ids only index the embedding table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from bench.common import model_config
from services.clip_shared.tokenizer import clip_tokenizer
from shapes.prompts import all_metadata
from shapes.vocab import TAGS

SCHEDULER_SHIFT = 3.0


@dataclass(frozen=True, kw_only=True)
class SD35MConfigs:
    transformer: dict[str, Any]
    vae: dict[str, Any]
    clip_l: dict[str, Any]
    clip_g: dict[str, Any]
    t5: dict[str, Any] = field(default_factory=dict)


def full_configs() -> SD35MConfigs:
    return SD35MConfigs(
        transformer=model_config("sd35m_transformer.json"),
        vae=model_config("sd35_vae.json"),
        clip_l=model_config("clip_l_text.json"),
        clip_g=model_config("clip_g_text.json"),
        t5=model_config("t5_xxl_encoder.json"),
    )


def tiny_configs() -> SD35MConfigs:
    """Widths 16 / 24 / 32 for CLIP-L / CLIP-G / T5 (768 / 1280 / 4096 in SD3.5-M), 3 transformer layers
    (two with dual attention), a 4-block VAE of width 8: 64² images, 8×8 latents."""
    full = full_configs()
    transformer = {
        **full.transformer,
        "sample_size": 8,
        "num_layers": 3,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 16 + 24,
        "pos_embed_max_size": 16,
        "dual_attention_layers": [0, 1],
    }
    vae = {**full.vae, "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4}
    vae["sample_size"] = 64

    def shrink(base: dict[str, Any], width: int) -> dict[str, Any]:
        sizes = {"hidden_size": width, "projection_dim": width, "intermediate_size": 2 * width}
        return {**base, **sizes, "num_hidden_layers": 2, "num_attention_heads": 2}

    t5 = {**full.t5, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}
    t5["relative_attention_num_buckets"] = 8
    return SD35MConfigs(
        transformer=transformer,
        vae=vae,
        clip_l=shrink(full.clip_l, 16),
        clip_g=shrink(full.clip_g, 24),
        t5=t5,
    )


def t5_words() -> list[str]:
    """Every word of the shapes prompts, so the offline T5 tokenizer needs no ``<unk>`` on them."""
    return sorted({word for tag in TAGS for record in all_metadata(tag) for word in record["prompt"].split()})


def t5_tokenizer() -> T5TokenizerFast:
    """transformers' T5 tokenizer class over a small Unigram vocabulary: T5's special ids (pad 0, ``</s>``
    1 appended to every prompt, ``<unk>`` 2), SentencePiece's ``▁`` word prefix, single-letter pieces."""
    pieces = [(f"▁{w}", -5.0) for w in t5_words()]
    pieces += [(c, -20.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), *pieces]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def sd35m_pipeline(
    configs: SD35MConfigs,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StableDiffusion3Pipeline:
    """The pipeline at random init (seeded per component), built on ``device`` (host init of the 4.7B-
    parameter T5-XXL would take minutes) and cast to ``dtype``."""

    def make(offset: int, build) -> Any:
        torch.manual_seed(seed + offset)
        with torch.device(device):
            module = build()
        # torch's own cast: diffusers' ModelMixin.to warns about float32-only modules even when it has none.
        return torch.nn.Module.to(module, dtype).eval()

    t5 = dict(configs.t5)
    return StableDiffusion3Pipeline(
        transformer=make(0, lambda: SD3Transformer2DModel.from_config(configs.transformer)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT),
        vae=make(1, lambda: AutoencoderKL.from_config(configs.vae)),
        text_encoder=make(3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**configs.clip_l))),
        tokenizer=clip_tokenizer(),
        text_encoder_2=make(4, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**configs.clip_g))),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=make(2, lambda: T5EncoderModel(T5Config(**t5))),
        tokenizer_3=t5_tokenizer(),
    )
