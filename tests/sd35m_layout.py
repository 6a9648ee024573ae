"""A tiny pipeline directory in exactly the layout and classes of ``stabilityai/stable-diffusion-3.5-medium``.

Every component is the class the hub repository names in its ``model_index.json``, configured as SD3.5-M
is except for the sizes: a ``SD3Transformer2DModel`` with 16 latent channels, patch 2, dual attention in
the first layers and RMS q/k norm; a 16-channel ``AutoencoderKL`` with four blocks (factor 8), no quant
convs and SD3.5's ``scaling_factor`` / ``shift_factor``; two ``CLIPTextModelWithProjection`` (CLIP-L and
CLIP-G roles, CLIP BPE tokenizers with the real vocabulary); a ``T5EncoderModel`` with a ``T5TokenizerFast``
built offline (pad 0, ``</s>`` 1 appended, ``<unk>`` 2, as T5's); ``FlowMatchEulerDiscreteScheduler`` with
shift 3.0. Written with diffusers' own ``save_pretrained``, so the directory is what a user would download.
"""

from __future__ import annotations

from pathlib import Path

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

from shapes.prompts import all_metadata
from shapes.tokenizer import clip_tokenizer
from shapes.vocab import TAGS

SCALING_FACTOR = 1.5305
SHIFT_FACTOR = 0.0609
"""SD3.5-M's VAE latent statistics (its vae/config.json)."""
CLIP_L, CLIP_G, T5_WIDTH = 16, 24, 32
"""Hidden sizes standing in for 768, 1280 and 4096: joint_attention_dim = T5's, pooled = CLIP-L + CLIP-G."""
RESOLUTION = 64
"""Image side: 8×8 latents through the factor-8 VAE."""


def t5_words() -> list[str]:
    """Every word of the shapes prompts (the prompts the tests train on), so T5 sees no ``<unk>``."""
    return sorted({word for tag in TAGS for record in all_metadata(tag) for word in record["prompt"].split()})


def t5_tokenizer() -> T5TokenizerFast:
    """transformers' own T5 tokenizer class over a small Unigram vocabulary: T5's special ids (pad 0,
    ``</s>`` 1 appended to every prompt, ``<unk>`` 2), SentencePiece's ``▁`` word prefix, letter pieces."""
    pieces = [(f"▁{w}", -5.0) for w in t5_words()]
    pieces += [(c, -20.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), *pieces]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def clip_encoder(hidden: int, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd35m_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """The pipeline in memory, float32, random weights seeded by ``seed``."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=16,
        pooled_projection_dim=CLIP_L + CLIP_G,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
        dual_attention_layers=(0, 1),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=RESOLUTION,
        scaling_factor=SCALING_FACTOR,
        shift_factor=SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer()),
            d_model=T5_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae.eval(),
        text_encoder=clip_encoder(CLIP_L, seed + 3),
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_encoder(CLIP_G, seed + 4),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer(),
    )


def write_tiny_sd35m(directory: Path, seed: int = 0) -> Path:
    """Save the pipeline with diffusers' ``save_pretrained`` (float32 safetensors); returns ``directory``."""
    tiny_sd35m_pipeline(seed).save_pretrained(directory)
    return directory
