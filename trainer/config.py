"""Typed configuration of an E2PO run, and the presets of the paper (Table 3) plus the CPU `shapes` world.

Every field is overridable from the command line with ``--set section.field=value``; the resolved
config is written to the run directory as ``config.json`` and is what ``--resume`` reads back.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainer.model import ModelConfig
from trainer.nft import NFTConfig
from trainer.perturb import PerturbConfig
from trainer.prompts import DataConfig
from trainer.rewards import RewardConfig, RewardSpec
from trainer.rollout import RolloutConfig
from trainer.update import OptimConfig
from trainer.validation import check, positive


@dataclass(kw_only=True)
class RunConfig:
    """The run itself: its name, seed, length, where it writes and on which device."""

    preset: str = "custom"
    """Which preset the config came from (recorded, so two runs side by side are told apart)."""
    seed: int = 42
    """Seed of every draw of the run: prompts, noises, perturbation inits, training timesteps
    (Table 3: 42); draws are keyed by it, so a resumed run repeats them exactly (trainer.seeding)."""
    iterations: int = 300
    """Total iterations of the run (a resumed run continues up to this number)."""
    out: str = "runs/e2po"
    """Run directory: config.json, metrics, checkpoints, TensorBoard events."""
    checkpoint_every: int = 10
    """Iterations between checkpoints (the last iteration is always saved)."""
    plot_every: int = 1
    """Iterations between updates of the run's curve plots; 0 never plots."""
    eval_every: int = 0
    """Must be 0: the loop does not evaluate; ``python -m trainer.evaluate --run DIR`` evaluates a
    checkpoint (and adds its grid and scores to the run's TensorBoard). Kept so saved configs load."""
    device: str = "auto"
    """torch device the model loads on; ``auto``: CUDA when available, else the CPU."""

    def __post_init__(self) -> None:
        positive("run", self, "seed", "iterations", "plot_every", "eval_every", strict=False)
        positive("run", self, "checkpoint_every")
        check(
            "run", "eval_every", self.eval_every, self.eval_every == 0, "0 (use python -m trainer.evaluate)"
        )
        check("run", "out", self.out, bool(self.out), "a directory")


@dataclass(kw_only=True)
class TrainConfig:
    """A whole run: one section per component, each defined and documented next to its code."""

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


CIRCLE_PROMPTS = (
    "a photo of a red circle",
    "a photo of a blue circle",
    "a photo of an orange circle",
    "a photo of a pink circle",
    "a photo of a green circle",
    "a photo of a black circle",
    "a photo of a yellow circle",
)
"""The seven circle prompts of the shapes training split's colors tag."""


def shapes_collapse() -> TrainConfig:
    """The shapes world where DiffusionNFT's groups go uniform (the paper's Fig. 2 situation), with the
    paper's perturbation in the shapes encoder's units.

    Training prompts are the seven circle-colour prompts, which the prior already half solves (GenEval
    score 0.54-0.71 each; its squares and triangles score 0.13-0.39), all seven every iteration: the
    training reward rises within the run and small groups tie more and more, while the held-out set (all
    six tags) keeps room. In pilots with DiffusionNFT G = 4 over 50 iterations, lr 6e-3 lifted the reward
    from 0.65 to 0.75 and the zero-std share from 0.20 to 0.34 (10-iteration means); 3e-3 learned
    more slowly and 1e-2 not at all. Departure from Table 3 for the tiny model: 4 optimiser steps an
    iteration, where one (Table 3) left the reward flat over 20 iterations of an earlier two-tag mix
    (docs/results-2026-12-two-tags.md). The perturbation is
    Table 3's: T_emb 300, μ 0.8, λ_div 50, and the max-norm 0.05 relative to the token scale, 0.05 /
    PAPER_CLIP_L_TOKEN_NORM = 0.125 × the prompt's mean CLIP-L token norm (0.06 per token for the
    shapes encoder, whose tokens average ~0.5).
    """
    cfg = shapes()
    cfg.data.train_tags = ("colors",)
    cfg.data.train_prompts = CIRCLE_PROMPTS
    cfg.data.num_prompts = len(CIRCLE_PROMPTS)
    cfg.data.balance_by_tag = False
    cfg.optim.lr, cfg.optim.optimizer_steps_per_iteration = 6e-3, 4
    # SD3.5-M's σ grid: the noise-aware schedule perturbs 7 of the 10 rollout steps (4 on the prior's own
    # shift-1 grid), and the prior loses nothing there (held-out 0.233 vs 0.236, docs/shapes.md).
    cfg.model.scheduler_shift = 3.0
    cfg.perturb = PerturbConfig(
        num_steps=300, max_norm_mode="relative", max_norm=PerturbConfig().max_norm / PAPER_CLIP_L_TOKEN_NORM
    )
    cfg.run.preset, cfg.run.out, cfg.run.iterations = "shapes-collapse", "runs/shapes-collapse", 40
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
