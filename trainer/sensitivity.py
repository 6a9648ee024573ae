"""How much a shapes prior listens to each text encoder — the property E2PO's CLIP-L perturbation relies on.

    python -m trainer.sensitivity [--model DIR] [--prompts 48] [--set perturb.max_norm=0.125 ...] [--json F]

SD3 trains with independent dropout of each text encoder, so either encoder alone conditions SD3.5-M; E2PO
perturbs only CLIP-L. On held-out prompts, at shared noises, with the ``shapes`` preset's rollout (Euler,
its step count, the noise-aware schedule), this measures:

* **Encoder swap** — prompt p sampled with CLIP-L's part of the conditioning (its features of
  ``prompt_embeds`` and of ``pooled``) taken from another prompt q, and likewise for CLIP-G: the share of
  samples whose training reward against p (GenEval-shapes partial credit) changes, and the pixel RMS to
  p's own image.
* **Perturbation vs noise** — the preset's optimised CLIP-L perturbations (``trainer.perturb``, K − 1 per
  prompt): pixel RMS of each perturbed sample to the anchor sample at the same noise, against the RMS
  between two noises under the anchor condition; and the share of (prompt, noise) cells whose reward is
  the same across all K conditions (ties, which give E2PO's groups no signal). Also which constraint
  binds: the share of content tokens whose δ sits at the max-norm bound, and the share of variants
  whose cos-to-anchor reached μ ± ε.

``--set section.field=value`` changes the preset as ``trainer.run`` does (the perturbation's bound,
T_emb, μ, λ_div; ``model.scheduler_shift`` for another σ grid). Pixels are in [0, 1]. Everything is
seeded; the numbers are those of ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shapes.heldout import DEFAULT_MODEL, EvalConfig, geneval_results, heldout_records, summarize
from shapes.model import read_manifest
from shapes.openmp import reexec_with_passive_openmp
from trainer.config import build_config
from trainer.model import FlowModel, load_model
from trainer.perturb import (
    PerturbConfig,
    PerturbResult,
    perturb_prompts,
    sample_initial_deltas,
)
from trainer.rollout import denoise, inference_sigmas
from trainer.sampler import perturbation_weight
from trainer.text import Conditioning


def swap_encoder(cond: Conditioning, donor: Conditioning, model: FlowModel, which: str) -> Conditioning:
    """``cond`` with CLIP-L's (``which='l'``) or CLIP-G's features replaced by ``donor``'s."""
    text = model.text
    width_l, width_g = text.text_encoder.config.hidden_size, text.text_encoder_2.config.hidden_size
    proj_l = text.text_encoder.config.projection_dim
    embeds, pooled = cond.prompt_embeds.clone(), cond.pooled.clone()
    clip_tokens = donor.prompt_embeds.shape[1] - text.max_sequence_length
    if which == "l":
        features, pooled_slice = slice(0, width_l), slice(0, proj_l)
    else:
        features, pooled_slice = slice(width_l, width_l + width_g), slice(proj_l, None)
    embeds[:, :clip_tokens, features] = donor.prompt_embeds[:, :clip_tokens, features]
    pooled[:, pooled_slice] = donor.pooled[:, pooled_slice]
    return Conditioning(embeds, pooled)


def to_images(model: FlowModel, x0: torch.Tensor) -> np.ndarray:
    return (model.decode(x0) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def rms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image pixel RMS of two (N, H, W, 3) uint8 batches, in [0, 1] units."""
    diff = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
    return np.sqrt((diff**2).reshape(len(a), -1).mean(axis=1))


def binding(result: PerturbResult, config: PerturbConfig) -> dict[str, float]:
    """Which constraint holds the perturbation back: the norm ball, or the anchor band μ ± ε."""
    counts = result.mask.sum(dim=-1)  # content tokens per prompt: the mean below is over all tokens
    token_norm_mean = (result.token_norm * counts).sum() / counts.sum().clamp(min=1)
    in_band = (result.cos_to_anchor - config.anchor_mu).abs() <= config.anchor_eps
    return {
        "token_norm_mean": float(token_norm_mean),
        "bound_mean": float(result.bound.mean()),
        "tokens_at_bound": result.tokens_at_bound(),
        "cos_to_anchor_min": float(result.cos_to_anchor.min()),
        "cos_to_anchor_max": float(result.cos_to_anchor.max()),
        "variants_in_anchor_band": float(in_band.float().mean()),
    }


def measure(model_dir: Path, num_prompts: int, seed: int, overrides: Sequence[str] = ()) -> dict[str, Any]:
    cfg = build_config("shapes", overrides=[f"model.path={model_dir}", *overrides])
    model = load_model(cfg.model, "cpu")
    rollout = cfg.rollout
    split_seed = (read_manifest(model_dir) or {}).get("pretrain", {}).get("split_seed", 0)
    records = heldout_records(split_seed)
    rng = np.random.default_rng(seed)
    records = [
        records[i] for i in rng.choice(len(records), size=min(num_prompts, len(records)), replace=False)
    ]
    prompts = [r["prompt"] for r in records]
    donors = [
        prompts[(i + 1 + int(rng.integers(len(prompts) - 1))) % len(prompts)] for i in range(len(prompts))
    ]
    noises = torch.randn(2, len(prompts), *model.sample_shape, generator=torch.Generator().manual_seed(seed))
    sigmas = inference_sigmas(model, rollout.num_steps)
    none = torch.zeros(len(prompts), dtype=torch.bool)
    everyone = torch.ones(len(prompts), dtype=torch.bool)

    def run(cond: Conditioning, noise: torch.Tensor, opt: Conditioning | None = None) -> np.ndarray:
        perturbed = none if opt is None else everyone
        return to_images(model, denoise(model, noise, cond, opt or cond, perturbed, sigmas, rollout))

    def rewards(images: np.ndarray) -> np.ndarray:
        """The training reward (GenEval's partial credit, what the shapes preset's service returns)."""
        return np.array([result.score for result in geneval_results(images, records)])

    with torch.no_grad():
        c_orig, c_donor = model.text.encode(prompts), model.text.encode(donors)
    anchor = run(c_orig, noises[0])
    anchor_results = geneval_results(anchor, records)
    anchor_reward = np.array([result.score for result in anchor_results])
    out: dict[str, Any] = {
        "model": str(model_dir),
        "prompts": len(prompts),
        "seed": seed,
        "overrides": list(overrides),
        "scheduler_shift": float(model.scheduler.config.shift),
        "perturbed_steps": rollout.num_steps
        if rollout.schedule == "static"
        else int((perturbation_weight(sigmas[:-1], rollout.rho) > 0).sum()),
        "steps": rollout.num_steps,
    }
    for which in ("l", "g"):
        swapped = run(swap_encoder(c_orig, c_donor, model, which), noises[0])
        out[f"swap_clip_{which}"] = {
            "reward_changed": float(np.mean(rewards(swapped) != anchor_reward)),
            "pixel_rms": float(rms(swapped, anchor).mean()),
        }

    variants = rollout.num_conditions - 1
    generator = torch.Generator().manual_seed(seed + 1)

    def draw_init(mask: torch.Tensor, dim: int) -> torch.Tensor:
        return sample_initial_deltas(mask, variants, dim, cfg.perturb.init_std, generator)

    result, c_opts = perturb_prompts(model.text, prompts, variants, cfg.perturb, draw_init)
    perturbed_rms, tie_rows = [], [anchor_reward]
    for v in range(variants):
        images = run(c_orig, noises[0], c_opts[torch.arange(len(prompts)) * variants + v])
        perturbed_rms.append(rms(images, anchor))
        tie_rows.append(rewards(images))
    between_noises = rms(run(c_orig, noises[1]), anchor)
    out["perturbation"] = {
        "variants_per_prompt": variants,
        "max_norm_mode": cfg.perturb.max_norm_mode,
        "max_norm": cfg.perturb.max_norm,
        "num_steps": cfg.perturb.num_steps,
        "anchor_mu": cfg.perturb.anchor_mu,
        "lambda_div": cfg.perturb.lambda_div,
        "cos_to_anchor_mean": float(result.cos_to_anchor.mean()),
        **binding(result, cfg.perturb),
        "pixel_rms_to_anchor_same_noise": float(np.mean(perturbed_rms)),
        "pixel_rms_between_noises": float(between_noises.mean()),
        "ties_across_k": float(np.mean(np.all(np.stack(tie_rows) == tie_rows[0], axis=0))),
    }
    out["anchor_reward_mean"] = float(anchor_reward.mean())
    out["anchor_correct"] = summarize(anchor_results, records, EvalConfig()).overall
    return out


def table(result: dict[str, Any]) -> str:
    p = result["perturbation"]
    rows = [
        f"model {result['model']}: {result['prompts']} held-out prompts, seed {result['seed']}, "
        f"shift {result['scheduler_shift']:g} (perturbed on {result['perturbed_steps']} of "
        f"{result['steps']} steps), overrides {result['overrides'] or 'none'}",
        f"anchor samples: reward {result['anchor_reward_mean']:.3f}, "
        f"GenEval-shapes overall {result['anchor_correct']:.3f}",
        f"swap CLIP-L: rewards changed {result['swap_clip_l']['reward_changed']:.3f}, "
        f"pixel RMS {result['swap_clip_l']['pixel_rms']:.4f}",
        f"swap CLIP-G: rewards changed {result['swap_clip_g']['reward_changed']:.3f}, "
        f"pixel RMS {result['swap_clip_g']['pixel_rms']:.4f}",
        f"perturbation ({p['variants_per_prompt']} per prompt, {p['max_norm_mode']} bound {p['max_norm']}): "
        f"cos to anchor {p['cos_to_anchor_mean']:.3f}, pixel RMS at a shared noise "
        f"{p['pixel_rms_to_anchor_same_noise']:.4f} vs {p['pixel_rms_between_noises']:.4f} between noises, "
        f"ties across K {p['ties_across_k']:.3f}",
        f"binding: CLIP-L content-token norm {p['token_norm_mean']:.3f}, bound {p['bound_mean']:.4f} per "
        f"token, tokens at the bound {p['tokens_at_bound']:.3f}; cos to anchor "
        f"{p['cos_to_anchor_min']:.3f}..{p['cos_to_anchor_max']:.3f}, variants within "
        f"mu {p['anchor_mu']} +- eps {p['variants_in_anchor_band']:.3f}",
    ]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    reexec_with_passive_openmp("trainer.sensitivity", argv)
    parser = argparse.ArgumentParser(
        prog="python -m trainer.sensitivity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="shapes pipeline directory")
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts to measure on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a preset field"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        result = measure(args.model, args.prompts, args.seed, args.set)
    except ValueError as exc:
        parser.error(str(exc))
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
