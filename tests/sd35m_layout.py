"""A tiny pipeline directory in exactly the layout and classes of ``stabilityai/stable-diffusion-3.5-medium``.

The components are ``bench.sd35m``'s at its tiny sizes (SD3.5-M's classes and configs with widths and depths
shrunk; see there), written with diffusers' own ``save_pretrained``, so the directory is what a user would
download: ``model_index.json`` and one sub-folder per component, float32 safetensors.
"""

from __future__ import annotations

from pathlib import Path

from bench.sd35m import sd35m_pipeline, tiny_configs

TINY = tiny_configs()
SCALING_FACTOR = TINY.vae["scaling_factor"]
SHIFT_FACTOR = TINY.vae["shift_factor"]
RESOLUTION = TINY.vae["sample_size"]
"""Image side: 8×8 latents through the factor-8 VAE."""
JOINT_ATTENTION_DIM = TINY.transformer["joint_attention_dim"]
POOLED_DIM = TINY.transformer["pooled_projection_dim"]


def write_tiny_sd35m(directory: Path, seed: int = 0) -> Path:
    """Save the pipeline with diffusers' ``save_pretrained``; returns ``directory``."""
    sd35m_pipeline(TINY, seed=seed).save_pretrained(directory)
    return directory
