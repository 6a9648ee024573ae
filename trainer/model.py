"""Loading the flow model (SD3 via diffusers, or the shapes world) and its two LoRA adapters.

Both kinds of model live in the SD3 pipeline layout (transformer/, scheduler/, text_encoder[_2,_3]/,
tokenizer[_2,_3]/, optional vae/), so one loader serves both: a directory without ``vae/`` is a
pixel-space model whose x0 is the image in [−1, 1].

Adapters (peft, through diffusers' adapter API): ``default`` is θ, the trained policy; ``old`` is
θ_old, the sampling policy, started as a copy of θ. Disabling adapters gives the frozen base model,
the KL reference.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from shapes.model import load_scheduler
from trainer.text import SD3TextEncoder
from trainer.validation import check, check_literals, positive

POLICY, OLD = "default", "old"
SHAPES_MODEL = Path(__file__).resolve().parent.parent / "shapes" / "weights"

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def pick_device(name: str) -> torch.device:
    """The torch device of ``run.device``: ``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(kw_only=True)
class ModelConfig:
    """Which flow model to fine-tune and how its adapters look."""

    path: str = "stabilityai/stable-diffusion-3.5-medium"
    """Hub id or local directory in the SD3 pipeline layout (transformer/, text_encoder*/, tokenizer*/,
    scheduler/, optional vae/ and text_encoder_3/). ``shapes`` = the shipped shapes-world model."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float16"
    """dtype of the frozen weights (Table 3: fp16 mixed precision). LoRA weights stay float32."""
    use_t5: bool = True
    """Load T5-XXL when the model has it; False fills its sequence slots with zeros, as diffusers does."""
    max_sequence_length: int = 128
    """T5 tokens in the conditioning (DiffusionNFT uses 128)."""
    resolution: int = 512
    """Image side in pixels (ignored in pixel-space models, whose size is the transformer's sample_size)."""
    lora_rank: int = 32
    """LoRA rank r of both adapters, θ and θ_old (Table 3: 32)."""
    lora_alpha: int = 64
    """LoRA α; the update is scaled by α / r (Table 3: 64, so 2)."""
    lora_targets: tuple[str, ...] = LORA_TARGETS
    """LoRA target modules (REFERENCE §2); suffix match also covers SD3.5's dual-attention attn2.*."""
    gradient_checkpointing: bool = False
    """Recompute the transformer's activations in the backward pass (memory for time; same result)."""
    scheduler_shift: float | None = None
    """Timestep shift of the σ grid the rollouts run on. None keeps the model's own scheduler config
    (SD3.5-M: 3.0; the shapes prior: 1.0, what it was trained with); a value replaces it, e.g. 3.0 to run
    the shapes prior on SD3.5-M's grid, where the noise-aware schedule perturbs 7 of 10 steps, not 4."""

    def __post_init__(self) -> None:
        check_literals("model", self)
        if self.scheduler_shift is not None:
            positive("model", self, "scheduler_shift")
        check("model", "path", self.path, bool(self.path), "a hub id, a local directory or 'shapes'")
        positive("model", self, "max_sequence_length", strict=False)
        positive("model", self, "resolution", "lora_rank", "lora_alpha")
        check("model", "lora_targets", self.lora_targets, bool(self.lora_targets), "at least one module")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FlowModel:
    """Everything the trainer touches: transformer (with adapters), scheduler, text side, decoder."""

    transformer: SD3Transformer2DModel
    scheduler: FlowMatchEulerDiscreteScheduler
    text: SD3TextEncoder
    vae: AutoencoderKL | None
    sample_shape: tuple[int, int, int]
    """(C, H, W) of x0: latent shape with a VAE, image shape in pixel space."""

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (B, C, H, W) → images (B, 3, H', W') float in [0, 1]."""
        if self.vae is None:
            return ((x0.float() + 1) / 2).clamp(0, 1)
        latents = x0.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return ((self.vae.decode(latents, return_dict=False)[0].float() + 1) / 2).clamp(0, 1)

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor
    ):
        """v(x, σ) from the transformer with whatever adapter is active; σ (B,) in [0, 1]."""
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            timestep=sigma * 1000,
            return_dict=False,
        )[0]


def resolve_path(path: str) -> str:
    return str(SHAPES_MODEL) if path == "shapes" else path


REQUIRED_COMPONENTS = (
    "transformer",
    "scheduler",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
)
OPTIONAL_COMPONENTS = ("vae", "text_encoder_3", "tokenizer_3")
"""Absent optional components mean a pixel-space model (no vae) or zero T5 slots (no T5), as in diffusers."""


def check_pipeline_dir(path: str) -> frozenset[str] | None:
    """Refuse a local directory that lacks a component it needs, naming the component; return the
    optional components it has (None for a hub id, which has the standard layout).

    Needed: the six CLIP/transformer/scheduler folders, and every component ``model_index.json`` lists
    with a class (a null entry, as the shapes model's vae, means the pipeline has none).
    """
    local = Path(path)
    if not local.exists():
        if local.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1:
            raise ValueError(f"model {path!r}: no such directory (and not a hub id owner/name)")
        return None
    if not local.is_dir():
        raise ValueError(f"model {path!r} is not a directory in the SD3 pipeline layout")
    needed = list(REQUIRED_COMPONENTS)
    index = local / "model_index.json"
    if index.is_file():
        listed = json.loads(index.read_text())
        needed += [c for c in OPTIONAL_COMPONENTS if isinstance(listed.get(c), list) and listed[c][0]]
    missing = [c for c in needed if not (local / c).is_dir()]
    if missing:
        raise ValueError(f"model {path!r} is missing component(s) {', '.join(f'{c}/' for c in missing)}")
    return frozenset(c for c in OPTIONAL_COMPONENTS if (local / c).is_dir())


def load_model(config: ModelConfig, device: torch.device | str = "cpu") -> FlowModel:
    """Load transformer, scheduler, text encoders and (if present) VAE; freeze everything."""
    path = resolve_path(config.path)
    optional = check_pipeline_dir(path)

    def has(component: str) -> bool:
        return optional is None or component in optional

    dtype = DTYPES[config.dtype]
    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
    scheduler = load_scheduler(path, config.scheduler_shift, subfolder="scheduler")
    text_kwargs = {}
    if config.use_t5 and has("text_encoder_3"):
        from transformers import T5EncoderModel, T5TokenizerFast

        text_kwargs = {
            "tokenizer_3": T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3"),
            "text_encoder_3": T5EncoderModel.from_pretrained(
                path, subfolder="text_encoder_3", torch_dtype=dtype
            ),
        }
    text = SD3TextEncoder(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder", torch_dtype=dtype
        ),
        tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", torch_dtype=dtype
        ),
        joint_attention_dim=transformer.config.joint_attention_dim,
        max_sequence_length=config.max_sequence_length,
        **text_kwargs,
    )
    vae = None
    if has("vae"):
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
    return assemble(transformer, scheduler, text, vae, config, device)


def assemble(
    transformer: SD3Transformer2DModel,
    scheduler: FlowMatchEulerDiscreteScheduler,
    text: SD3TextEncoder,
    vae: AutoencoderKL | None,
    config: ModelConfig,
    device: torch.device | str,
) -> FlowModel:
    """Freeze, move to device, and add the two LoRA adapters (also used with tiny models in tests)."""
    transformer.requires_grad_(False)
    for module in (transformer, text.text_encoder, text.text_encoder_2, text.text_encoder_3, vae):
        if module is not None:
            module.to(device)
    if vae is not None:
        vae.requires_grad_(False)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        size = config.resolution // factor
        shape = (transformer.config.in_channels, size, size)
    else:
        size = transformer.config.sample_size
        shape = (transformer.config.in_channels, size, size)
    add_policy_adapters(transformer, config)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return FlowModel(transformer=transformer, scheduler=scheduler, text=text, vae=vae, sample_shape=shape)


def add_policy_adapters(transformer: SD3Transformer2DModel, config: ModelConfig) -> None:
    """θ ("default", trainable, float32) and θ_old ("old", a copy of θ)."""
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        init_lora_weights="gaussian",
        target_modules=list(config.lora_targets),
    )
    transformer.add_adapter(lora, adapter_name=POLICY)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # two adapters on purpose
        transformer.add_adapter(lora, adapter_name=OLD)
    load_adapter_state(transformer, OLD, adapter_state(transformer, POLICY))
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # adapters train in float32 over half-precision weights
    use_adapter(transformer, POLICY)


def lora_config_kwargs(transformer: SD3Transformer2DModel, name: str = POLICY) -> dict[str, Any]:
    """The ``LoraConfig`` keyword arguments that rebuild adapter ``name`` elsewhere (the LoRA export)."""
    config = transformer.peft_config[name]
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules),
        "lora_dropout": config.lora_dropout,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
    }


def use_adapter(transformer: SD3Transformer2DModel, name: str) -> None:
    """Activate an adapter; keep only θ trainable (peft flips requires_grad to the active adapter)."""
    transformer.set_adapter(name)
    for pname, param in transformer.named_parameters():
        if "lora_" in pname:
            param.requires_grad_(f".{POLICY}." in pname)


@contextlib.contextmanager
def active_adapter(transformer: SD3Transformer2DModel, name: str) -> Iterator[None]:
    """Adapter ``name`` active for the block, θ (``POLICY``) again after it, however the block ends."""
    use_adapter(transformer, name)
    try:
        yield
    finally:
        use_adapter(transformer, POLICY)


@torch.no_grad()
def merge_adapter(transformer: SD3Transformer2DModel, name: str) -> None:
    """Fold adapter ``name`` into the base weights, for inference only (evaluation).

    A merged layer runs only its base matmul: on the shapes model an unmerged LoRA forward costs about 2.6×
    the base one on CPU. The result equals the unmerged forward up to float rounding; training must not
    continue on a merged model (θ would count twice)."""
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[name])


def adapter_named_params(transformer: SD3Transformer2DModel, name: str) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters keyed by peft's adapter-free state-dict names, in module order.

    These are the names ``StableDiffusion3Pipeline.save_lora_weights`` expects (after its own
    ``transformer.`` prefix), e.g. ``transformer_blocks.0.attn.to_q.lora_A.weight``.
    """
    marker = f".{name}."
    return {
        n.replace(marker, "."): p for n, p in transformer.named_parameters() if "lora_" in n and marker in n
    }


def adapter_params(transformer: SD3Transformer2DModel, name: str) -> list[torch.nn.Parameter]:
    return list(adapter_named_params(transformer, name).values())


def adapter_state(transformer: SD3Transformer2DModel, name: str) -> dict[str, torch.Tensor]:
    """A detached copy of the adapter's tensors."""
    return {k: p.detach().clone() for k, p in adapter_named_params(transformer, name).items()}


@torch.no_grad()
def load_adapter_state(transformer: SD3Transformer2DModel, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the adapter; the key sets must match exactly."""
    params = adapter_named_params(transformer, name)
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"adapter {name!r} state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, param in params.items():
        param.copy_(state[key])
