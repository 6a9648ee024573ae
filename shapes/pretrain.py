"""Pretrain the shapes model with SD3's flow-matching objective on freshly rendered scenes.

    python -m shapes.pretrain --out DIR [--steps N] [--batch-size B] [--seed S] [--resume]
                              [--num-layers L] [--num-heads H] [--patch-size P] [--object-size MIN MAX]

Every step renders a new batch of train-split scenes (``shapes.prompts.split_prompts``; the test prompts are
never seen) and takes one AdamW step on SD3's rectified-flow loss (REFERENCE.md §1):

    x_t = (1 − σ)·x0 + σ·ε,   target v = ε − x0,   loss = mean (v̂(x_t, σ·1000, caption) − v)²

with σ drawn logit-normally (SD3's "lognorm(0, 1)" sampling, the best of its comparison) and mapped through
the scheduler's shift. The state (weights, their EMA, optimiser, both RNGs, step, wall time) is checkpointed
atomically about once a minute to ``DIR/resume.pt``; ``--resume`` continues from it bit-for-bit. At the end
the model (the EMA weights) is written to DIR in the SD3 pipeline layout with ``manifest.json``
(``shapes.model``) and the checkpoint is removed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from shapes.model import (
    MANIFEST,
    ShapesModel,
    ShapesModelConfig,
    build_tiny,
    from_uint8,
    num_parameters,
    save_shapes_model,
)
from shapes.openmp import reexec_with_passive_openmp
from shapes.prompts import Metadata, PromptSplitConfig, split_prompts
from shapes.render import render
from shapes.scene import SceneConfig
from shapes.vocab import TAGS

CHECKPOINT = "resume.pt"
RUNTIME_FIELDS = frozenset({"num_threads", "checkpoint_every_s"})
"""PretrainConfig fields that say how a run uses the machine, not what it trains: free to change on resume."""


@dataclass(kw_only=True)
class PretrainConfig:
    """One pretraining run. Defaults are the shipped model's run (docs/shapes.md)."""

    steps: int = 16000
    """Optimiser steps: 33 min on 2 idle cores (0.12 s a step). In the four-class world held-out
    GenEval-shapes rose only from 0.129 at 8,000 steps to 0.138 at 16,000 while the loss fell from 0.047 to
    0.040, so more steps buy little."""
    batch_size: int = 16
    """Scenes per step, each rendered fresh. At equal compute 16 reached a lower loss than 32 (0.068 after
    2,400 steps vs 0.077 after 1,200)."""
    learning_rate: float = 2e-3
    """Peak AdamW learning rate, reached after ``warmup_steps`` and cosine-decayed to 0 at ``steps``."""
    warmup_steps: int = 100
    """Linear warm-up from 0."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay. 0: it would shrink the 49,000 token-embedding rows no prompt uses."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip over all trained parameters."""
    ema_decay: float = 0.999
    """The exported weights are an exponential moving average of the trained ones, decay
    min(ema_decay, (1 + step) / (10 + step)) (DiffusionNFT's warm-up form); 0 exports the last iterate.
    Diffusion samples are markedly cleaner from averaged weights."""
    t_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    """How σ is drawn before the shift: SD3's logit-normal (mass on mid noise levels) or uniform on (0, 1)."""
    logit_mean: float = 0.0
    """Mean of the logit-normal (SD3: 0)."""
    logit_std: float = 1.0
    """Std of the logit-normal (SD3: 1)."""
    train_text_encoders: bool = True
    """Train both CLIP encoders jointly with the transformer. A frozen random encoder conditions as well, but
    its token embeddings carry no meaning, so E2PO's perturbations would have no semantic neighbourhood to
    explore (evidence in docs/shapes.md)."""
    caption_dropout: float = 0.0
    """Probability of replacing a caption by the empty prompt (SD3 drops captions for classifier-free
    guidance; here it is only a knob to weaken the prior)."""
    encoder_dropout: float = 0.15
    """Probability, drawn independently for each text encoder, of replacing that encoder's caption by the
    empty prompt. SD3 trains with an independent 46.3 % dropout per text encoder (Esser et al., 2024, §5.3),
    which is why each encoder alone conditions SD3.5-M — and why E2PO can steer it through CLIP-L only.
    The shipped prior uses 0.15: at 0.463 the prior, sampled without guidance as RL rollouts are, followed
    prompts worse than without dropout (docs/shapes.md). 0 draws nothing, so runs without it keep the
    random streams of the first prior's recipe."""
    tag_weight_exponent: float = 0.5
    """A caption is drawn by picking tag t with probability ∝ n_t ** exponent (n_t: its train prompts), then
    one of its prompts uniformly. 1 samples the train prompts uniformly (92 % color_attr), 0 the tags
    uniformly. Colour-rich captions are what teaches the model to follow its text: with tags drawn
    uniformly the samples ignored colour words after 2,400 steps, with exponent 1 they followed them after
    800 (docs/shapes.md); 0.5 keeps color_attr at 62 % and the counting and position tags at 6 % and 12 %."""
    split_seed: int = 0
    """Seed of ``split_prompts`` (default ``PromptSplitConfig``): which prompts are held out."""
    seed: int = 0
    """Seeds the initial weights, the scenes and the noise."""
    checkpoint_every_s: float = 60.0
    """Wall seconds between resumable checkpoints."""
    num_threads: int = 2
    """torch intra-op threads (the CPU budget of the run)."""
    model: ShapesModelConfig = field(default_factory=ShapesModelConfig)
    """Architecture."""
    scene: SceneConfig = field(default_factory=SceneConfig)
    """How training scenes are laid out and drawn (object sizes, gaps); part of what the prior learns."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}.")
        for name in ("caption_dropout", "encoder_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        return out


def learning_rate(step: int, config: PretrainConfig) -> float:
    """Linear warm-up to ``learning_rate`` then cosine decay to 0 at ``steps``; ``step`` counts from 0."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def draw_training_sigmas(
    num: int,
    generator: torch.Generator,
    *,
    t_sampling: Literal["logit_normal", "uniform"],
    shift: float,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """(num,) noise levels σ ∈ (0, 1): draw u, then apply the scheduler's shift σ = s·u / (1 + (s − 1)·u)."""
    if t_sampling == "logit_normal":
        u = torch.sigmoid(torch.randn(num, generator=generator) * logit_std + logit_mean)
    else:
        u = torch.rand(num, generator=generator)
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(
    model: ShapesModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
) -> torch.Tensor:
    """Scalar rectified-flow loss. x0, noise: (B, 3, H, W) in [-1, 1] / N(0, 1); sigmas: (B,)."""
    s = sigmas.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    v = model.transformer(
        hidden_states=x_t,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        timestep=sigmas * 1000,
    ).sample
    return torch.nn.functional.mse_loss(v, noise - x0)


@dataclass(kw_only=True)
class TrainPrompts:
    """The train split, grouped by tag, with the token ids of every prompt computed once."""

    records: list[Metadata]
    by_tag: list[np.ndarray]
    """Per tag (in ``TAGS`` order): indices into ``records``."""
    ids_l: torch.Tensor
    """(N + 1, L) CLIP-L ids; the last row is the empty prompt (caption dropout)."""
    ids_g: torch.Tensor
    """(N + 1, L) CLIP-G ids, same rows."""

    @classmethod
    def build(cls, model: ShapesModel, split_seed: int) -> TrainPrompts:
        records, _ = split_prompts(PromptSplitConfig(), split_seed)
        by_tag = [np.array([i for i, r in enumerate(records) if r["tag"] == tag]) for tag in TAGS]
        ids_l, ids_g = model.tokenize([r["prompt"] for r in records] + [""])
        return cls(records=records, by_tag=by_tag, ids_l=ids_l, ids_g=ids_g)

    def tag_probabilities(self, exponent: float) -> np.ndarray:
        """(num_tags,) probability of each tag: ∝ (number of its train prompts) ** exponent."""
        weights = np.array([len(indices) for indices in self.by_tag], dtype=np.float64) ** exponent
        return weights / weights.sum()

    def draw(self, num: int, rng: np.random.Generator, *, tag_weight_exponent: float) -> np.ndarray:
        """(num,) record indices: a tag by ``tag_probabilities``, then one of its prompts uniformly."""
        tags = rng.choice(len(self.by_tag), size=num, p=self.tag_probabilities(tag_weight_exponent))
        return np.array([self.by_tag[t][rng.integers(len(self.by_tag[t]))] for t in tags])


class Pretrainer:
    """Model, optimiser and every source of randomness of one run; ``step()`` advances it by one update."""

    def __init__(self, config: PretrainConfig) -> None:
        self.config = config
        self.model = build_tiny(config.model, config.seed)
        self.prompts = TrainPrompts.build(self.model, config.split_seed)
        scene_seed, noise_seed = np.random.SeedSequence([config.seed, 1]).generate_state(2)
        self.scene_rng = np.random.default_rng(int(scene_seed))
        self.noise_rng = torch.Generator().manual_seed(int(noise_seed))
        self.trained = self.model.components()
        if not config.train_text_encoders:
            self.trained = {"transformer": self.model.transformer}
        for module in self.model.components().values():
            module.train()
            module.requires_grad_(False)
        for module in self.trained.values():
            module.requires_grad_(True)
        self.parameters = [p for m in self.trained.values() for p in m.parameters()]
        # fused: one kernel per step, not a dozen passes over the 5.7M parameters (half the time on CPU).
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
        )
        self.ema = {
            name: {key: p.detach().clone() for key, p in module.named_parameters()}
            for name, module in self.trained.items()
        }
        self.num_steps_done = 0
        self.elapsed_s = 0.0
        self.losses: list[float] = []

    def step(self) -> float:
        """One optimiser update; returns its loss."""
        config = self.config
        picks = self.prompts.draw(
            config.batch_size, self.scene_rng, tag_weight_exponent=config.tag_weight_exponent
        )
        images = np.stack([render(self.prompts.records[i], self.scene_rng, self.config.scene) for i in picks])
        x0 = from_uint8(images)
        noise = torch.randn(x0.shape, generator=self.noise_rng)
        sigmas = draw_training_sigmas(
            len(picks),
            self.noise_rng,
            t_sampling=config.t_sampling,
            shift=config.model.shift,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
        )
        rows_l, rows_g = self.caption_rows(picks)
        with torch.set_grad_enabled(config.train_text_encoders):
            ids_l, ids_g = self.prompts.ids_l[rows_l], self.prompts.ids_g[rows_g]
            prompt_embeds, pooled = self.model.encode_ids(ids_l, ids_g)
        loss = flow_matching_loss(self.model, x0, noise, sigmas, prompt_embeds, pooled)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.num_steps_done, config)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm)
        self.optimizer.step()
        self.update_ema()
        self.num_steps_done += 1
        self.losses.append(float(loss.item()))
        return self.losses[-1]

    def caption_rows(self, picks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``ids_l`` and ``ids_g`` for each pick after caption and per-encoder dropout."""
        config, empty = self.config, len(self.prompts.records)
        dropped = torch.rand(len(picks), generator=self.noise_rng) < config.caption_dropout
        rows = torch.where(dropped, empty, torch.from_numpy(picks))
        if config.encoder_dropout == 0.0:
            return rows, rows
        drop_l, drop_g = torch.rand(2, len(picks), generator=self.noise_rng) < config.encoder_dropout
        return torch.where(drop_l, empty, rows), torch.where(drop_g, empty, rows)

    def update_ema(self) -> None:
        step = self.num_steps_done
        decay = min(self.config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, module in self.trained.items():
                averages = self.ema[name]
                for key, p in module.named_parameters():
                    averages[key].lerp_(p, 1.0 - decay)

    def averaged_model(self) -> ShapesModel:
        """A copy of the model carrying the EMA weights (the live model is left as it is)."""
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, module in model.components().items():
                if name in self.ema:
                    for key, p in module.named_parameters():
                        p.copy_(self.ema[name][key])
        return model

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "step": self.num_steps_done,
            "elapsed_s": self.elapsed_s,
            "losses": self.losses,
            "weights": {name: m.state_dict() for name, m in self.model.components().items()},
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema,
            "scene_rng": self.scene_rng.bit_generator.state,
            "noise_rng": self.noise_rng.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a checkpoint made with the same configuration; only the CPU budget and the
        checkpoint period (:data:`RUNTIME_FIELDS`) may differ, so a run can be given more cores when
        the machine frees up (bit-for-bit continuation then holds for the same thread count only)."""
        saved = {k: v for k, v in state["config"].items() if k not in RUNTIME_FIELDS}
        now = {k: v for k, v in self.config.to_dict().items() if k not in RUNTIME_FIELDS}
        if saved != now:
            changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
            raise ValueError(
                "the checkpoint was made with another configuration; resume with the same arguments "
                f"(differing: {changed}; checkpoint: {saved}, now: {now})."
            )
        for name, module in self.model.components().items():
            module.load_state_dict(state["weights"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema = state["ema"]
        self.scene_rng.bit_generator.state = state["scene_rng"]
        self.noise_rng.set_state(state["noise_rng"])
        self.num_steps_done = state["step"]
        self.elapsed_s = state["elapsed_s"]
        self.losses = list(state["losses"])

    def loss_log(self, window: int = 50) -> list[tuple[int, float]]:
        """(last step, mean loss) per ``window`` steps."""
        return [
            (min(start + window, len(self.losses)), float(np.mean(self.losses[start : start + window])))
            for start in range(0, len(self.losses), window)
        ]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file beside ``path``, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def machine_summary(num_threads: int) -> dict[str, Any]:
    import diffusers
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": num_threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def train(
    config: PretrainConfig, out: Path, *, resume: bool, command: str, progress: bool = True
) -> dict[str, Any]:
    """Run (or continue) the pretraining into ``out``; returns the manifest written there."""
    torch.set_num_threads(config.num_threads)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / CHECKPOINT
    trainer = Pretrainer(config)
    if checkpoint.exists():
        if not resume:
            raise ValueError(
                f"{checkpoint} exists: pass --resume to continue it, or remove it to start over."
            )
        state = load_checkpoint(checkpoint)
        trainer.load_state_dict(state)
        command = state["command"]
    bar = tqdm(total=config.steps, initial=trainer.num_steps_done, disable=not progress, desc="pretrain")
    tick = last_save = time.monotonic()
    while trainer.num_steps_done < config.steps:
        trainer.step()
        bar.update(1)
        if trainer.num_steps_done % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(trainer.losses[-50:]):.4f}")
        now = time.monotonic()
        # Wall time of the whole run (checkpoints included) summed over its sessions.
        trainer.elapsed_s += now - tick
        tick = now
        if now - last_save >= config.checkpoint_every_s:
            save_checkpoint(checkpoint, {**trainer.state_dict(), "command": command})
            last_save = tick = time.monotonic()
            trainer.elapsed_s += last_save - now
    bar.close()
    checksums = save_shapes_model(trainer.averaged_model(), out)
    manifest = {
        "model": "shapes-sd3 (pixel space, CLIP-L + CLIP-G roles, no T5, no VAE)",
        "image_mapping": "image = (x0 + 1) / 2, x0 being the model's clean sample in [-1, 1]",
        "config": config.model.to_dict(),
        "pretrain": config.to_dict(),
        "parameters": {name: num_parameters(m) for name, m in trainer.model.components().items()},
        "weights_dtype": "float16",
        "sha256": checksums,
        "command": command,
        "seed": config.seed,
        "wall_time_s": round(trainer.elapsed_s, 1),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_summary(config.num_threads),
        "final_loss_last_100_steps": float(np.mean(trainer.losses[-100:])),
        "loss_log": trainer.loss_log(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    checkpoint.unlink(missing_ok=True)
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    reexec_with_passive_openmp("shapes.pretrain", argv)
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output pipeline directory")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--caption-dropout", type=float, default=defaults.caption_dropout)
    parser.add_argument(
        "--encoder-dropout",
        type=float,
        default=defaults.encoder_dropout,
        help="per text encoder, independent (SD3: 0.463; the shipped prior: 0.15)",
    )
    parser.add_argument("--tag-weight-exponent", type=float, default=defaults.tag_weight_exponent)
    parser.add_argument("--t-sampling", choices=("logit_normal", "uniform"), default=defaults.t_sampling)
    parser.add_argument(
        "--freeze-text-encoders", action="store_true", help="keep both CLIP encoders at their random init"
    )
    parser.add_argument("--shift", type=float, default=defaults.model.shift)
    parser.add_argument("--num-layers", type=int, default=defaults.model.num_layers)
    parser.add_argument(
        "--num-heads", type=int, default=defaults.model.num_attention_heads, help="width = heads × 64"
    )
    parser.add_argument("--patch-size", type=int, default=defaults.model.patch_size)
    lo, hi = defaults.scene.object_size_range()
    parser.add_argument(
        "--object-size",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=(lo, hi),
        help=f"side range of rendered training objects in pixels (default {lo} {hi})",
    )
    parser.add_argument("--threads", type=int, default=defaults.num_threads)
    parser.add_argument("--resume", action="store_true", help="continue DIR/resume.pt")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = PretrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        learning_rate=args.lr,
        caption_dropout=args.caption_dropout,
        encoder_dropout=args.encoder_dropout,
        tag_weight_exponent=args.tag_weight_exponent,
        t_sampling=args.t_sampling,
        train_text_encoders=not args.freeze_text_encoders,
        num_threads=args.threads,
        model=ShapesModelConfig(
            shift=args.shift,
            num_layers=args.num_layers,
            num_attention_heads=args.num_heads,
            patch_size=args.patch_size,
            # SD3.5's dual-attention blocks are the first half of the stack.
            dual_attention_layers=tuple(range(args.num_layers // 2)),
        ),
        scene=SceneConfig(
            image_size=defaults.scene.image_size,
            object_size_frac=tuple(side / defaults.scene.image_size for side in args.object_size),
        ),
    )
    command = shlex.join(["python", "-m", "shapes.pretrain", *(a for a in argv if a != "--resume")])
    manifest = train(config, args.out, resume=args.resume, command=command, progress=not args.no_progress)
    print(
        f"{args.out}: {config.steps} steps in {manifest['wall_time_s']:.0f} s, final loss "
        f"{manifest['final_loss_last_100_steps']:.4f}"
    )


if __name__ == "__main__":
    main()
