"""The shapes text-to-image model: a tiny SD3 in pixel space, stored in an SD3 pipeline's on-disk layout.

A shapes pipeline directory has the sub-folders of a Stable Diffusion 3 pipeline, so the trainer loads the
shapes model and SD3.5-M the same way; plain diffusers opens and samples it (docs/shapes.md)::

    pipe = StableDiffusion3Pipeline.from_pretrained(
        dir, vae=None, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    x0 = pipe(prompt, guidance_scale=1.0, max_sequence_length=0, output_type="latent").images

``dtype`` because the files are float16 storage (the model computes in float32); ``max_sequence_length=0``
because the model has no T5 slots; ``output_type="latent"`` because x0 is the image (there is no VAE to
decode with; the pipeline's default size then assumes a factor-8 VAE and lands on the 32×32 sample size).
The layout::

    model_index.json          components, as a diffusers pipeline writes it (vae and T5 entries are null)
    transformer/              SD3Transformer2DModel (pixel space: 3 in/out channels)
    scheduler/                FlowMatchEulerDiscreteScheduler config
    text_encoder/ tokenizer/      CLIP-L role
    text_encoder_2/ tokenizer_2/  CLIP-G role
    manifest.json             written by ``shapes.pretrain``: config, sha256 per weight file, command, scores

There is no VAE: the transformer denoises 32×32 RGB images directly, so its clean sample x0 IS the image in
[-1, 1], and ``image = (x0 + 1) / 2`` (see :func:`to_uint8`). Flow-matching conventions are SD3's: x_t =
(1 − σ)·x0 + σ·ε, the transformer predicts v = ε − x0 and is called with ``timestep = σ·1000``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from services.clip_shared.tokenizer import END_OF_TEXT, write_clip_tokenizer_files
from shapes.text import (
    CLIP_G_PAD_TOKEN,
    ClipTextConfig,
    build_clip_text_encoder,
    clip_features,
    clip_tokenizers,
    sd3_condition,
    tokenize,
)

MANIFEST = "manifest.json"
SHAPES_MAX_LENGTH = 16
"""CLIP context of the shapes model. SD3 pads to 77, but the longest shapes prompt is 12 tokens with SOS/EOS,
and every padding token also runs through the joint transformer: 16 trains 1.4× faster than 77 on 2 cores
(0.110 vs 0.151 s per batch-16 step) with the same information. Padding stays in the layout (SD3's
transformer attends to it), only shorter."""
NUM_CHANNELS = 3
"""RGB in pixel space."""


@dataclass(kw_only=True)
class ShapesModelConfig:
    """Architecture of the shapes model. Defaults are the shipped model's (``shapes/weights``)."""

    image_size: int = 32
    """Side of the generated square image in pixels (the renderer's default)."""
    patch_size: int = 4
    """Transformer patch side: 32/4 = 8×8 = 64 image tokens. Patch 2 (256 tokens) trains ≈ 4× slower on 2 CPU
    cores (DESIGN.md, "Shapes world")."""
    num_layers: int = 4
    """Joint transformer blocks. SD3.5-M: 24."""
    num_attention_heads: int = 2
    """Heads per attention; width = heads × ``attention_head_dim`` = 128."""
    attention_head_dim: int = 64
    """Head width, as SD3.5-M's."""
    dual_attention_layers: tuple[int, ...] = (0, 1)
    """Blocks with SD3.5's extra image self-attention (``attn2``): the first half, like SD3.5-M's blocks 0–12
    of 24, so adapters see the module names they see on SD3.5-M."""
    qk_norm: Literal["rms_norm"] | None = "rms_norm"
    """Query/key normalisation, as SD3.5-M."""
    joint_attention_dim: int = 128
    """Width of ``prompt_embeds``. The CLIP-L + CLIP-G token width is zero-padded up to it, as SD3 pads 2048
    to T5's 4096."""
    clip_l: ClipTextConfig = field(default_factory=lambda: ClipTextConfig(max_length=SHAPES_MAX_LENGTH))
    """CLIP-L role encoder (the one E2PO perturbs)."""
    clip_g: ClipTextConfig = field(
        default_factory=lambda: ClipTextConfig(hidden_act="gelu", max_length=SHAPES_MAX_LENGTH)
    )
    """CLIP-G role encoder (gelu like OpenCLIP bigG; pads with "!" like SD3's second tokenizer)."""
    shift: float = 1.0
    """Timestep shift of the flow-matching scheduler, σ' = shift·σ / (1 + (shift − 1)·σ). SD3 trains its 256²
    stage (32×32×16 latent values) unshifted and shifts by sqrt(values / base) at higher resolution (3.0 at
    1024²); a 32×32×3 image has fewer values than that base, so the shapes model uses 1.0."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size must be a multiple of patch_size, got {self.image_size} and {self.patch_size}."
            )
        if self.clip_l.max_length != self.clip_g.max_length:
            raise ValueError(
                f"both CLIP roles need one context length (SD3 concatenates them per token), got "
                f"{self.clip_l.max_length} and {self.clip_g.max_length}."
            )
        width = self.clip_l.hidden_size + self.clip_g.hidden_size
        if self.joint_attention_dim < width:
            raise ValueError(
                f"joint_attention_dim must be >= CLIP-L + CLIP-G hidden size {width}, got "
                f"{self.joint_attention_dim}."
            )
        if any(not 0 <= i < self.num_layers for i in self.dual_attention_layers):
            raise ValueError(
                f"dual_attention_layers must lie in [0, {self.num_layers}), got {self.dual_attention_layers}."
            )
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}.")

    def to_dict(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["clip_l"], out["clip_g"] = dict(vars(self.clip_l)), dict(vars(self.clip_g))
        out["dual_attention_layers"] = list(self.dual_attention_layers)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ShapesModelConfig:
        raw = dict(raw)
        raw["clip_l"], raw["clip_g"] = ClipTextConfig(**raw["clip_l"]), ClipTextConfig(**raw["clip_g"])
        raw["dual_attention_layers"] = tuple(raw["dual_attention_layers"])
        return cls(**raw)


@dataclass(kw_only=True, eq=False)
class ShapesModel:
    """The components of a shapes pipeline; names follow ``StableDiffusion3Pipeline``'s."""

    transformer: SD3Transformer2DModel
    scheduler: FlowMatchEulerDiscreteScheduler
    tokenizer: CLIPTokenizer
    """CLIP-L role tokenizer (pads with end-of-text)."""
    tokenizer_2: CLIPTokenizer
    """CLIP-G role tokenizer (pads with "!")."""
    text_encoder: CLIPTextModelWithProjection
    text_encoder_2: CLIPTextModelWithProjection
    t5_sequence_length: int = 0
    """All-zero T5 slots appended to ``prompt_embeds`` (diffusers' ``max_sequence_length`` without a T5
    encoder). 0: they hold no information and only cost attention."""

    @property
    def image_size(self) -> int:
        return int(self.transformer.config.sample_size)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP-L ids, CLIP-G ids), each (B, L)."""
        return tokenize(self.tokenizer, prompts), tokenize(self.tokenizer_2, prompts)

    def encode_ids(self, ids_l: torch.Tensor, ids_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (B, L + t5_sequence_length, joint_attention_dim), pooled (B, p_L + p_G)) with L the
        CLIP context length; keeps the autograd graph so the text encoders can be trained."""
        return sd3_condition(
            clip_features(self.text_encoder, ids_l),
            clip_features(self.text_encoder_2, ids_g),
            joint_attention_dim=int(self.transformer.config.joint_attention_dim),
            t5_sequence_length=self.t5_sequence_length,
        )

    def encode_prompt(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The SD3 condition of ``prompts``, as ``StableDiffusion3Pipeline.encode_prompt`` computes it with
        ``text_encoder_3=None`` and ``max_sequence_length=t5_sequence_length``."""
        return self.encode_ids(*self.tokenize(prompts))

    def components(self) -> dict[str, torch.nn.Module]:
        """The trainable components by sub-folder name."""
        return {
            "transformer": self.transformer,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }


def build_transformer(config: ShapesModelConfig, seed: int) -> SD3Transformer2DModel:
    num_patches = config.image_size // config.patch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SD3Transformer2DModel(
            sample_size=config.image_size,
            patch_size=config.patch_size,
            in_channels=NUM_CHANNELS,
            out_channels=NUM_CHANNELS,
            num_layers=config.num_layers,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            joint_attention_dim=config.joint_attention_dim,
            caption_projection_dim=config.num_attention_heads * config.attention_head_dim,
            pooled_projection_dim=config.clip_l.projection_dim + config.clip_g.projection_dim,
            pos_embed_max_size=num_patches,
            qk_norm=config.qk_norm,
            dual_attention_layers=config.dual_attention_layers,
        )


def build_scheduler(config: ShapesModelConfig) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.shift)


def build_tiny(config: ShapesModelConfig | None = None, seed: int = 0) -> ShapesModel:
    """A randomly initialised shapes model, deterministic in ``seed`` (global RNGs untouched)."""
    config = config or ShapesModelConfig()
    seed_transformer, seed_l, seed_g = (
        int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(3)
    )
    tokenizer, tokenizer_2 = clip_tokenizers(config.clip_l.max_length)
    return ShapesModel(
        transformer=build_transformer(config, seed_transformer),
        scheduler=build_scheduler(config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        text_encoder=build_clip_text_encoder(config.clip_l, seed_l),
        text_encoder_2=build_clip_text_encoder(config.clip_g, seed_g),
    )


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _model_index() -> dict[str, Any]:
    """diffusers' pipeline index: which class each sub-folder holds; null marks an absent component."""
    return {
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder_3": [None, None],
        "tokenizer_3": [None, None],
        "vae": [None, None],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }


def save_shapes_model(
    model: ShapesModel, path: str | Path, *, weights_dtype: torch.dtype = torch.float16
) -> dict[str, str]:
    """Write ``model`` in the pipeline layout; returns {weight file relative path: sha256}.

    Weights are stored as ``weights_dtype`` (float16 halves the repository size; every value is loaded back
    exactly into float32) from copies, so ``model`` itself is not modified. The tokenizers are written as
    vocab.json + merges.txt, the format of SD3's own tokenizer folders.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for name, module in model.components().items():
        clone = copy.deepcopy(module)
        # torch's own cast: diffusers' ModelMixin.to warns about float32-only modules even when it has none.
        torch.nn.Module.to(clone, dtype=weights_dtype)
        clone.save_pretrained(out / name)
    for name, tokenizer, pad in (
        ("tokenizer", model.tokenizer, END_OF_TEXT),
        ("tokenizer_2", model.tokenizer_2, CLIP_G_PAD_TOKEN),
    ):
        _write_tokenizer(out / name, pad_token=pad, max_length=tokenizer.model_max_length)
    model.scheduler.save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(_model_index(), indent=2) + "\n")
    return weight_checksums(out)


def _write_tokenizer(path: Path, *, pad_token: str, max_length: int) -> None:
    write_clip_tokenizer_files(path, pad_token=pad_token)
    # The context length lives in the tokenizer config, where diffusers' pipeline reads it.
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_max_length"] = max_length
    config_file.write_text(json.dumps(config, indent=2))


def weight_checksums(path: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every .safetensors file under ``path``, sorted by path."""
    root = Path(path)
    return {
        f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*.safetensors"))
    }


def load_scheduler(
    path: str | Path, shift: float | None = None, *, subfolder: str | None = None
) -> FlowMatchEulerDiscreteScheduler:
    """The saved flow-matching scheduler (a local folder or hub id, optionally a ``subfolder`` of it), with
    its timestep shift replaced when ``shift`` is given. The one place a run overrides the saved shift."""
    overrides = {} if shift is None else {"shift": shift}
    return FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder=subfolder, **overrides)


def load_shapes_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    shift: float | None = None,
) -> ShapesModel:
    """Load a shapes pipeline directory (weights cast to ``dtype``, modules in eval mode).

    ``shift`` replaces the scheduler's timestep shift (None keeps the saved one), to sample a prior on
    another σ grid than it was trained on, e.g. SD3.5-M's 3.0.
    """
    root = Path(path)
    if not (root / "transformer").is_dir():
        raise ValueError(f"{root} is not a shapes pipeline directory: it has no transformer/ sub-folder.")
    transformer = SD3Transformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype)
    text_encoders = [
        CLIPTextModelWithProjection.from_pretrained(root / name, dtype=dtype)
        for name in ("text_encoder", "text_encoder_2")
    ]
    tokenizers = [CLIPTokenizer.from_pretrained(root / name) for name in ("tokenizer", "tokenizer_2")]
    model = ShapesModel(
        transformer=transformer.to(device).eval(),
        scheduler=load_scheduler(root / "scheduler", shift),
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        text_encoder=text_encoders[0].to(device).eval(),
        text_encoder_2=text_encoders[1].to(device).eval(),
    )
    return model


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The directory's manifest.json, or None if it has none (e.g. a freshly built tiny model)."""
    file = Path(path) / MANIFEST
    return json.loads(file.read_text()) if file.is_file() else None


def to_uint8(x0: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) model sample in [-1, 1] → (B, H, W, 3) uint8 image via image = (x0 + 1) / 2, quantised as
    the reward services do (round(x·255), clamped)."""
    image = ((x0.detach().float().cpu() + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)
    return image.permute(0, 2, 3, 1).numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 images → (B, 3, H, W) float32 x0 in [-1, 1] (inverse of :func:`to_uint8`)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0
