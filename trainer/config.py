"""Typed configuration of an E2PO run, and the presets of the paper (Table 3) plus the CPU `shapes` world.

Every field is overridable from the command line with ``--set section.field=value``; the resolved
config is written to the run directory as ``config.json`` and is what ``--resume`` reads back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.geneval.metadata import TAGS as GENEVAL_TAGS
from trainer.perturb import PerturbConfig
from trainer.validation import check, check_literals, positive

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


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
    lora_alpha: int = 64
    lora_targets: tuple[str, ...] = LORA_TARGETS
    """LoRA target modules (REFERENCE §2); suffix match also covers SD3.5's dual-attention attn2.*."""
    gradient_checkpointing: bool = False
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


@dataclass(kw_only=True)
class DataConfig:
    """Where prompts (and their reward metadata) come from."""

    train: str = "shapes"
    """JSONL file of {"prompt", ...metadata} records (GenEval metadata format), or ``shapes`` for the
    shapes world's generated train split."""
    test: str = "shapes"
    """Held-out prompts for evaluation, same format."""
    num_prompts: int = 48
    """Prompts per iteration, over all ranks (each prompt gets G·K samples). **choice**: DiffusionNFT's
    48 groups per epoch."""
    train_tags: tuple[str, ...] = ()
    """Train only on records with these GenEval tags (empty: every record). The held-out set is not
    filtered, so a run trained on a few easy tags can saturate its training reward while the held-out
    score still has room (the ``shapes-collapse`` preset)."""
    balance_by_tag: bool = True
    """Draw training prompts tag by tag in turn (every tag trains equally, however few prompts it has),
    or uniformly over the records (False). A tag with fewer prompts than its share of an iteration's
    draws repeats them within the iteration, and repeated draws of a prompt form one group."""

    def __post_init__(self) -> None:
        for name in ("train", "test"):
            check("data", name, getattr(self, name), bool(getattr(self, name)), "a JSONL path or 'shapes'")
        positive("data", self, "num_prompts")
        unknown = [t for t in self.train_tags if t not in GENEVAL_TAGS]
        check("data", "train_tags", self.train_tags, not unknown, f"GenEval tags from {list(GENEVAL_TAGS)}")


@dataclass(kw_only=True)
class RolloutConfig:
    """Sampling of the exploration set: G noises × K conditions per prompt."""

    num_noises: int = 4
    """G in the paper: latent noises per prompt, each shared across the K conditions (Eq. 8)."""
    num_conditions: int = 12
    """K in the paper: the original condition plus K − 1 optimised perturbations. K = 1 is DiffusionNFT."""
    num_steps: int = 10
    """Sampler steps for rollouts (Table 3: train sample steps 10)."""
    sampler: Literal["dpm2m", "euler"] = "dpm2m"
    """DPM-Solver++(2M) as DiffusionNFT; Euler as an option."""
    rho: float = 0.4
    """Noise-aware schedule width (Eq. 13): perturbation only while σ > 1 − ρ."""
    schedule: Literal["noise_aware", "static"] = "noise_aware"
    """``static`` applies the perturbed condition at every step (ablation)."""
    include_original: bool = True
    """Reference-anchored batching: one of the K conditions is C_orig. False = all K perturbed (ablation)."""
    train_condition: Literal["original", "generating"] = "original"
    """Decoupled optimisation: updates condition on C_orig (default) or on the condition that
    generated the sample (ablation)."""
    batch_size: int = 16
    """Samples per transformer forward during rollout (memory knob; does not change results)."""

    def __post_init__(self) -> None:
        check_literals("rollout", self)
        positive("rollout", self, "num_noises", "num_conditions", "num_steps", "batch_size")
        check("rollout", "rho", self.rho, 0 <= self.rho <= 1, "in [0, 1]")


@dataclass(kw_only=True)
class NFTConfig:
    """DiffusionNFT objective (REFERENCE §2)."""

    nft_beta: float = 1.0
    kl_weight: float = 1e-4
    adv_clip: float = 5.0
    std_mode: Literal["global", "group"] = "global"
    old_decay: Literal["linear", "none", "ocr"] = "linear"
    train_timestep_fraction: float = 0.99
    """Train on the first int(fraction·steps) of each sample's shuffled sampler timesteps (9 of 10, as
    DiffusionNFT computes it)."""
    ema: bool = True

    def __post_init__(self) -> None:
        check_literals("nft", self)
        positive("nft", self, "nft_beta", "adv_clip")
        positive("nft", self, "kl_weight", strict=False)
        fraction = self.train_timestep_fraction
        check("nft", "train_timestep_fraction", fraction, 0 < fraction <= 1, "in (0, 1]")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    train_batch_size: int = 8
    """Samples per training forward."""
    optimizer_steps_per_iteration: int = 1
    """**choice**: Table 3's "grad-accum per epoch 1" read as one optimiser step per iteration, the
    gradient accumulated over all of the iteration's samples and train timesteps."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"

    def __post_init__(self) -> None:
        check_literals("optim", self)
        positive("optim", self, "lr", "eps", "train_batch_size", "optimizer_steps_per_iteration")
        positive("optim", self, "weight_decay", "grad_clip", strict=False)  # grad_clip 0: no clipping
        ok = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        check("optim", "betas", self.betas, ok, "two values in [0, 1)")


@dataclass(kw_only=True)
class RewardSpec:
    """One reward: a service endpoint (or a locally started one) and its weight in R = Σ w·R_k."""

    name: str
    """Service name, e.g. ``geneval``; also the prefix of its logged metrics."""
    output: str = ""
    """Which per-sample output is the reward (default: the service's first declared output)."""
    weight: float = 1.0
    endpoint: str = ""
    """HOST:PORT of a running service; empty = start one locally with ``local_args``."""
    local_args: tuple[str, ...] = ()
    """Arguments after ``python -m services.serve NAME`` when started locally."""

    def __post_init__(self) -> None:
        check("reward", "name", self.name, bool(self.name), "a service name")
        check("reward", "weight", self.weight, math.isfinite(self.weight), "a finite number")


@dataclass(kw_only=True)
class RewardConfig:
    rewards: list[RewardSpec] = field(default_factory=list)
    timeout_s: float = 600.0
    """Deadline for one chunk's scores, retries included; past it the run fails with a clear error."""
    token_env: str = "E2PO_REWARD_TOKEN"
    """Environment variable holding the bearer token (tokens never go into config.json)."""
    connect_timeout_s: float = 120.0
    """How long the start waits for each reward service to answer (a pod still being scheduled);
    past it the run stops with the endpoint named."""

    def __post_init__(self) -> None:
        positive("reward", self, "timeout_s", "connect_timeout_s")
        for spec in self.rewards:
            spec.__post_init__()


@dataclass(kw_only=True)
class RunConfig:
    preset: str = "custom"
    seed: int = 42
    iterations: int = 300
    """Total iterations of the run (a resumed run continues up to this number)."""
    out: str = "runs/e2po"
    checkpoint_every: int = 10
    plot_every: int = 1
    eval_every: int = 0
    """Must be 0: the loop does not evaluate; ``python -m trainer.evaluate --run DIR`` evaluates a
    checkpoint (and adds its grid and scores to the run's TensorBoard). Kept so saved configs load."""
    device: str = "auto"

    def __post_init__(self) -> None:
        positive("run", self, "seed", "iterations", "plot_every", "eval_every", strict=False)
        positive("run", self, "checkpoint_every")
        check(
            "run", "eval_every", self.eval_every, self.eval_every == 0, "0 (use python -m trainer.evaluate)"
        )
        check("run", "out", self.out, bool(self.out), "a directory")


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> TrainConfig:
        """Check every section again (presets and code may assign fields after construction)."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).__post_init__()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """A saved config.json, every section validated (an edited file fails here, naming the field)."""
        if not path.is_file():
            raise ValueError(f"{path.parent} is not a run directory: it has no config.json")
        try:
            return from_dict(cls, json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from None


# -- presets ---------------------------------------------------------------------------------------


def _geneval_rewards() -> list[RewardSpec]:
    return [
        RewardSpec(name="geneval", output="geneval/score", local_args=("--detector", "ultralytics")),
    ]


def geneval_k12() -> TrainConfig:
    """E2PO on GenEval, high exploration: G = 4, K = 12, 300 iterations (Table 3)."""
    cfg = TrainConfig()
    cfg.rollout.num_noises, cfg.rollout.num_conditions = 4, 12
    cfg.run.iterations = 300
    cfg.reward.rewards = _geneval_rewards()
    cfg.data.train, cfg.data.test = "geneval_train.jsonl", "geneval_test.jsonl"
    return cfg


def geneval_k4() -> TrainConfig:
    """E2PO on GenEval, efficient: G = 2, K = 4, 850 iterations (Table 3)."""
    cfg = geneval_k12()
    cfg.rollout.num_noises, cfg.rollout.num_conditions = 2, 4
    cfg.run.iterations = 850
    return cfg


def pickscore_k3() -> TrainConfig:
    """E2PO on PickScore: G = 8, K = 3, 750 iterations (Table 3)."""
    cfg = TrainConfig()
    cfg.rollout.num_noises, cfg.rollout.num_conditions = 8, 3
    cfg.run.iterations = 750
    cfg.reward.rewards = [RewardSpec(name="pickscore", output="pickscore")]
    cfg.data.train, cfg.data.test = "pickscore_train.jsonl", "pickscore_test.jsonl"
    return cfg


def shapes() -> TrainConfig:
    """The CPU shapes world: GenEval with the exact shapes detector, sized for seconds per iteration.

    Departures from Table 3, each because of the tiny model: LoRA r 8 / α 16 and lr 1e-3 (a 2-3M
    parameter transformer), float32 on CPU, fewer prompts per iteration, Euler sampling, and the
    perturbation max-norm relative to the tiny encoder's token-embedding scale (see PerturbConfig).
    """
    cfg = TrainConfig()
    cfg.model = ModelConfig(
        path="shapes", dtype="float32", use_t5=False, max_sequence_length=0, lora_rank=8, lora_alpha=16
    )
    cfg.data = DataConfig(train="shapes", test="shapes", num_prompts=8)
    cfg.rollout = RolloutConfig(num_noises=4, num_conditions=4, num_steps=10, sampler="euler", batch_size=16)
    cfg.perturb = PerturbConfig(num_steps=100, max_norm_mode="relative", max_norm=0.2)
    cfg.optim = OptimConfig(lr=1e-3, train_batch_size=64, mixed_precision="no")
    cfg.reward.rewards = [
        RewardSpec(name="geneval", output="geneval/score", local_args=("--detector", "shapes"))
    ]
    # Sized for `make demo`: ~19 s an iteration on two idle cores, so 20 iterations take about 7 minutes
    # (13 at the 40 s seen on a loaded machine) -- long enough for the reward to move (docs/results.md).
    cfg.run = RunConfig(preset="shapes", iterations=20, out="runs/shapes", checkpoint_every=5, device="cpu")
    return cfg


PAPER_CLIP_L_TOKEN_NORM = 0.4
"""Typical L2 norm of a CLIP ViT-L/14 token embedding (the lookup E2PO perturbs): in-distribution vocabulary
tokens sit near 0.4 (Kim et al., "Directional Textual Inversion", arXiv 2512.13672). The paper's absolute
bound 0.05 is therefore 0.05 / 0.4 = 0.125 of a token's norm."""


def shapes_collapse() -> TrainConfig:
    """The shapes world where DiffusionNFT's groups go uniform (the paper's Fig. 2 situation), with the
    paper's perturbation in the shapes encoder's units.

    Training prompts are the two tags the prior already half solves (single_object, colors: 25 prompts,
    drawn uniformly, so an iteration's 8 prompts are distinct), so the training reward can saturate and
    small groups tie, while the held-out set (all six tags) keeps room. The perturbation is Table 3's:
    T_emb 300, μ 0.8, λ_div 50, and the max-norm 0.05 relative to the token scale, 0.05 /
    PAPER_CLIP_L_TOKEN_NORM = 0.125 × the prompt's mean CLIP-L token norm (0.06 per token for the
    shapes encoder, whose tokens average ~0.5).
    """
    cfg = shapes()
    cfg.data.train_tags = ("single_object", "colors")
    cfg.data.balance_by_tag = False  # tag turns would repeat single_object's 2 prompts each iteration
    # SD3.5-M's σ grid: the noise-aware schedule perturbs 7 of the 10 rollout steps (4 on the prior's own
    # shift-1 grid), and the prior loses nothing there (held-out 0.233 vs 0.236, docs/shapes.md).
    cfg.model.scheduler_shift = 3.0
    cfg.perturb = PerturbConfig(
        num_steps=300, max_norm_mode="relative", max_norm=PerturbConfig().max_norm / PAPER_CLIP_L_TOKEN_NORM
    )
    cfg.run.preset, cfg.run.out, cfg.run.iterations = "shapes-collapse", "runs/shapes-collapse", 20
    return cfg


PRESETS = {
    "geneval-k12": geneval_k12,
    "geneval-k4": geneval_k4,
    "pickscore-k3": pickscore_k3,
    "shapes": shapes,
    "shapes-collapse": shapes_collapse,
}


def build_config(
    preset: str, *, baseline: Literal["e2po", "nft"] = "e2po", overrides: list[str] = ()
) -> TrainConfig:
    """A preset, optionally as its DiffusionNFT baseline at equal samples per prompt, with overrides."""
    try:
        cfg = PRESETS[preset]()
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}") from None
    cfg.run.preset = preset
    if baseline == "nft":
        # Equal search budget: K = 1 and G = the preset's G·K samples per prompt.
        cfg.rollout.num_noises *= cfg.rollout.num_conditions
        cfg.rollout.num_conditions = 1
        cfg.run.preset = f"{preset}+nft"
    for item in overrides:
        apply_override(cfg, item)
    return cfg.validate()


# -- overrides and (de)serialisation ---------------------------------------------------------------


def apply_override(cfg: TrainConfig, item: str) -> None:
    """Apply ``section.field=value`` (value parsed by the field's type)."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise ValueError(f"override {item!r} must look like section.field=value")
    *path, name = key.strip().split(".")
    target: Any = cfg
    for part in path:
        if not hasattr(target, part):
            raise ValueError(f"override {item!r}: no config section {part!r}")
        target = getattr(target, part)
    fields = {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
    if name not in fields:
        raise ValueError(f"override {item!r}: {type(target).__name__} has no field {name!r}")
    hints = typing.get_type_hints(type(target))
    previous = getattr(target, name)
    setattr(target, name, _parse(hints[name], raw.strip(), key))
    try:
        target.__post_init__()  # a dataclass section validates itself; setattr alone would skip it
    except ValueError as exc:
        setattr(target, name, previous)
        raise ValueError(f"--set {item}: {exc}") from None


def _parse(tp: Any, raw: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if raw not in tp.__args__:
            raise ValueError(f"{key}: {raw!r} is not one of {list(tp.__args__)}")
        return raw
    if tp is bool:
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{key}: expected a boolean, got {raw!r}")
        return raw.lower() in ("true", "1", "yes")
    if tp in (int, float, str):
        try:
            return tp(raw)
        except ValueError:
            raise ValueError(f"{key}: expected {tp.__name__}, got {raw!r}") from None
    if origin is tuple:
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        args = typing.get_args(tp)
        item_types = [args[0]] * len(parts) if args[-1] is Ellipsis else list(args)
        if len(item_types) != len(parts):
            raise ValueError(f"{key}: expected {len(item_types)} comma-separated values, got {raw!r}")
        return tuple(_parse(t, p, key) for t, p in zip(item_types, parts, strict=True))
    if origin in (types.UnionType, typing.Union):
        non_none = [a for a in tp.__args__ if a is not type(None)]
        return None if raw.lower() == "none" else _parse(non_none[0], raw, key)
    raise ValueError(f"{key}: cannot be set from the command line (type {tp})")


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild nested dataclasses from ``asdict`` output, refusing unknown keys."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            kwargs[name] = [from_dict(typing.get_args(tp)[0], v) for v in value]
        elif typing.get_origin(tp) is tuple:
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
