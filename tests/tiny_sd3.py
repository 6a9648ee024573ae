"""Tiny SD3 pipelines built from configs (no weights anywhere): pixel space or with a tiny VAE."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from services.clip_shared.tokenizer import clip_tokenizer
from trainer.model import FlowModel, ModelConfig, assemble
from trainer.text import SD3TextEncoder


def tiny_clip(hidden: int, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_components(*, latent: bool = False, seed: int = 0) -> dict:
    clip_l, clip_g = tiny_clip(16, seed), tiny_clip(24, seed + 1)
    torch.manual_seed(seed + 2)
    channels = 4 if latent else 3
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=channels,
        out_channels=channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        caption_projection_dim=16,
        pooled_projection_dim=16 + 24,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = None
    if latent:
        torch.manual_seed(seed + 3)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=16,
            shift_factor=0.06,
            scaling_factor=1.5,
        )
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text": SD3TextEncoder(
            tokenizer=clip_tokenizer(),
            text_encoder=clip_l,
            tokenizer_2=clip_tokenizer(),
            text_encoder_2=clip_g,
            joint_attention_dim=48,
            max_sequence_length=4,
        ),
        "vae": vae,
    }


def tiny_model(config: ModelConfig | None = None, *, latent: bool = False, seed: int = 0) -> FlowModel:
    parts = tiny_components(latent=latent, seed=seed)
    config = config or ModelConfig(
        path="tiny", dtype="float32", use_t5=False, lora_rank=4, lora_alpha=8, resolution=16
    )
    return assemble(parts["transformer"], parts["scheduler"], parts["text"], parts["vae"], config, "cpu")


def vae_less_pipeline(
    transformer: SD3Transformer2DModel,
    scheduler: FlowMatchEulerDiscreteScheduler,
    clip_l,
    tokenizer,
    clip_g,
    tokenizer_2,
) -> StableDiffusion3Pipeline:
    """diffusers' own SD3 pipeline over given parts, without VAE or T5 (a pixel-space model, as users
    assemble one): what tests compare the project's sampling and exports against."""
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=None,
        text_encoder=clip_l,
        tokenizer=tokenizer,
        text_encoder_2=clip_g,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
