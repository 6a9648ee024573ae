"""GPU profile of E2PO on the SD3.5-Medium architecture at random init: no weights are needed.

    python -m bench.gpu_sd3          # one H100/H200-class GPU, < 8 minutes → bench/results/gpu_sd3.json
    python -m bench.gpu_sd3 --smoke  # scaled-down config on CPU, checks the script → gpu_sd3_smoke.json

Measured with the trainer's own functions, each part in a fresh child process (clean peak memory, and
accelerate allows one mixed-precision setting per process):

* ``policy_bf16`` — SD3.5-M transformer (``bench/configs/sd35m_transformer.json``, REFERENCE §1) in bf16 with
  the two LoRA r32 adapters (``trainer.model.add_policy_adapters``), 512² = 64×64 latents, text sequence
  77 CLIP + 128 T5 tokens. Rollout: one prompt's G×K grid (G 4, K 12: 48 samples) through
  ``trainer.rollout.denoise`` (10 DPM-Solver++(2M) steps, noise-aware schedule, batches of 16) → images/s of
  the transformer (no VAE decode). Update: ``trainer.update.nft_update`` (θ_old + θ + reference forwards,
  backward, AdamW step, 9 train timesteps per sample) with bf16 autocast → samples/s.
* ``nft_style_fp16`` — the same update as DiffusionNFT runs it: fp32 weights, fp16 autocast, grad scaler.
* ``perturb`` — ``trainer.perturb.optimize_perturbations`` for 48 prompts × 11 variants, 300 Adam steps
  (Table 3), on CLIP-L's architecture (``bench/configs/clip_l_text.json``, 123M) at random init in fp16.

The update tries train batch sizes 8, 4, 2 and keeps the first that fits in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bench.common import model_config

PARTS = ("policy_bf16", "nft_style_fp16", "perturb")
RESULT_PREFIX = "RESULT "


@dataclass(frozen=True, kw_only=True)
class Scale:
    """Sizes of one run: the real ones, or the CPU smoke test's."""

    transformer: dict[str, Any]
    clip: dict[str, Any]
    latent_size: int
    text_tokens: int
    """77 CLIP tokens + T5 tokens (DiffusionNFT keeps 128)."""
    num_noises: int
    num_conditions: int
    rollout_batch: int
    train_batch_sizes: tuple[int, ...]
    update_repeats: int
    perturb_prompts: int
    perturb_variants: int
    perturb_steps: int


def full_scale() -> Scale:
    return Scale(
        transformer=model_config("sd35m_transformer.json"),
        clip=model_config("clip_l_text.json"),
        latent_size=64,
        text_tokens=77 + 128,
        num_noises=4,
        num_conditions=12,
        rollout_batch=16,
        train_batch_sizes=(8, 4, 2),
        update_repeats=3,
        perturb_prompts=48,
        perturb_variants=11,
        perturb_steps=300,
    )


def smoke_scale() -> Scale:
    """Same code paths, sizes that run in seconds on a CPU."""
    transformer = model_config("sd35m_transformer.json")
    transformer.update(
        sample_size=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
        dual_attention_layers=[0],
    )
    clip = model_config("clip_l_text.json")
    clip.update(
        hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2, num_attention_heads=2
    )
    return Scale(
        transformer=transformer,
        clip=clip,
        latent_size=8,
        text_tokens=77 + 8,
        num_noises=2,
        num_conditions=3,
        rollout_batch=4,
        train_batch_sizes=(4, 2),
        update_repeats=1,
        perturb_prompts=4,
        perturb_variants=2,
        perturb_steps=3,
    )


# -- measurement helpers -------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def _timed(out: dict[str, float], key: str) -> Iterator[None]:
    _sync()
    started = time.perf_counter()
    yield
    _sync()
    out[key] = time.perf_counter() - started


def _gib(num_bytes: int) -> float:
    return num_bytes / 2**30


def _memory() -> dict[str, float | None]:
    """Peak device memory allocated since the last reset (None on CPU)."""
    if not torch.cuda.is_available():
        return {"peak_gib": None}
    return {"peak_gib": _gib(torch.cuda.max_memory_allocated())}


def _reset_peak() -> float | None:
    """Start a new peak-memory window; returns what is allocated now (GiB, None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    return _gib(torch.cuda.memory_allocated())


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- the parts -----------------------------------------------------------------------------------------


def _flow_model(scale: Scale, dtype: torch.dtype) -> Any:
    """SD3.5-M transformer at random init with θ and θ_old adapters, wrapped as the trainer's FlowModel."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from trainer.model import FlowModel, ModelConfig, add_policy_adapters

    device = _device()
    torch.manual_seed(0)
    # Built directly on the device: initialising 2.5B parameters on the host would take minutes.
    with torch.device(device):
        transformer = SD3Transformer2DModel.from_config(scale.transformer)
    transformer = transformer.to(dtype).requires_grad_(False)
    add_policy_adapters(transformer, ModelConfig(lora_rank=32, lora_alpha=64))
    shape = (scale.transformer["in_channels"], scale.latent_size, scale.latent_size)
    # Rollout and update never touch the text side; the perturbation part measures it on its own.
    return FlowModel(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text=None,  # type: ignore[arg-type]
        vae=None,
        sample_shape=shape,
    )


def _condition(scale: Scale, rows: int, dtype: torch.dtype, device: torch.device) -> Any:
    from trainer.text import Conditioning

    joint = scale.transformer["joint_attention_dim"]
    pooled = scale.transformer["pooled_projection_dim"]
    return Conditioning(
        torch.randn(rows, scale.text_tokens, joint, device=device, dtype=dtype),
        torch.randn(rows, pooled, device=device, dtype=dtype),
    )


def measure_rollout(scale: Scale, model: Any, accelerator: Any) -> dict[str, Any]:
    from trainer.model import OLD, POLICY, use_adapter
    from trainer.rollout import (
        RolloutConfig,
        RolloutPlan,
        denoise,
        draw_noise,
        inference_sigmas,
        iterate_chunks,
        sample_conditions,
    )

    device = _device()
    config = RolloutConfig(
        num_noises=scale.num_noises, num_conditions=scale.num_conditions, batch_size=scale.rollout_batch
    )
    plan = RolloutPlan.build(1, config)
    noise = draw_noise(config, model.sample_shape, [torch.Generator().manual_seed(0)])
    dtype = model.transformer.dtype
    c_orig = _condition(scale, 1, dtype, device)
    c_opt = _condition(scale, scale.num_conditions - 1, dtype, device)
    sigmas = inference_sigmas(model, config.num_steps)
    times: dict[str, float] = {}

    def run(steps: torch.Tensor, chunks: int | None) -> None:
        for number, indices in enumerate(iterate_chunks(plan, config.batch_size)):
            if chunks is not None and number >= chunks:
                return
            x1 = noise[plan.prompt_index[indices], plan.noise_index[indices]].to(device)
            orig, opt, perturbed = sample_conditions(indices, plan, c_orig, c_opt)
            denoise(model, x1, orig, opt, perturbed, steps, config, accelerator.autocast)

    use_adapter(model.transformer, OLD)
    try:
        with _timed(times, "warmup_s"):
            run(sigmas[-3:], chunks=1)
        with _timed(times, "rollout_s"):
            run(sigmas, chunks=None)
    finally:
        use_adapter(model.transformer, POLICY)
    samples = len(plan)
    return {
        "grid": f"G {scale.num_noises} × K {scale.num_conditions} = {samples} samples, "
        f"batches of {config.batch_size}",
        "steps": config.num_steps,
        "sampler": config.sampler,
        "seconds": times["rollout_s"],
        "images_per_s": samples / times["rollout_s"],
        "warmup_s": times["warmup_s"],
    }


def measure_update(scale: Scale, model: Any, accelerator: Any, mixed_precision: str) -> dict[str, Any]:
    from trainer.model import POLICY, adapter_params
    from trainer.nft import NFTConfig
    from trainer.rollout import inference_sigmas
    from trainer.update import Learner, OptimConfig, TrainBatch, nft_update, train_sigmas

    optimizer = torch.optim.AdamW(adapter_params(model.transformer, POLICY), lr=3e-4, weight_decay=1e-4)
    prepared, optimizer = accelerator.prepare(model.transformer, optimizer)
    sigmas = inference_sigmas(model, 10)
    nft = NFTConfig()
    generator = torch.Generator().manual_seed(1)
    tried = []
    for batch_size in scale.train_batch_sizes:
        optim = OptimConfig(train_batch_size=batch_size, mixed_precision=mixed_precision)  # type: ignore[arg-type]
        batch = TrainBatch(
            x0=torch.randn(batch_size, *model.sample_shape),
            condition=_condition(scale, batch_size, torch.float32, torch.device("cpu")),
            r=torch.rand(batch_size),
            sigmas=sigmas,
            generators=[torch.Generator().manual_seed(i) for i in range(batch_size)],
            order=generator,
        )

        def step(o: Any = optim, b: Any = batch) -> None:
            nft_update(Learner(model, prepared, optimizer, accelerator), b, nft, o)

        try:
            times: dict[str, float] = {}
            with _timed(times, "warmup_s"):
                step()  # a full update: the timed ones then meet no first-call costs
            _reset_peak()
            with _timed(times, "update_s"):
                for _ in range(scale.update_repeats):
                    step()
        except torch.OutOfMemoryError:
            tried.append(batch_size)
            optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        samples = batch_size * scale.update_repeats
        timesteps = train_sigmas(sigmas, nft.train_timestep_fraction, [torch.Generator()]).shape[1]
        return {
            "train_batch_size": batch_size,
            "out_of_memory_at": tried,
            "timesteps_per_sample": timesteps,
            "forwards": "θ_old + θ + reference (kl_weight > 0), backward on θ",
            "seconds": times["update_s"],
            "samples_per_s": samples / times["update_s"],
            "warmup_s": times["warmup_s"],
            **_memory(),
        }
    return {"out_of_memory_at": tried, "samples_per_s": None}


def part_policy_bf16(scale: Scale) -> dict[str, Any]:
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16", cpu=not torch.cuda.is_available())
    model = _flow_model(scale, torch.bfloat16)
    params = sum(p.numel() for p in model.transformer.parameters())
    lora = sum(p.numel() for n, p in model.transformer.named_parameters() if "lora_" in n)
    # Built in float32 and cast: the peak window starts after the cast.
    weights_gib = _reset_peak()
    rollout = measure_rollout(scale, model, accelerator)
    rollout.update(_memory())
    update = measure_update(scale, model, accelerator, "bf16")
    return {
        "weights": "bf16, LoRA float32",
        "parameters": params - lora,
        "lora_parameters_both_adapters": lora,
        "allocated_after_build_gib": weights_gib,
        "rollout": rollout,
        "update": update,
    }


def part_nft_style_fp16(scale: Scale) -> dict[str, Any]:
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="fp16", cpu=not torch.cuda.is_available())
    model = _flow_model(scale, torch.float32)
    return {"weights": "float32, fp16 autocast", "update": measure_update(scale, model, accelerator, "fp16")}


def part_perturb(scale: Scale) -> dict[str, Any]:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from services.clip_shared.tokenizer import clip_tokenizer
    from trainer.perturb import PerturbConfig, content_mask, optimize_perturbations
    from trainer.prompts import load_records
    from trainer.text import token_embeddings_replaced

    device = _device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        encoder = CLIPTextModelWithProjection(CLIPTextConfig(**scale.clip))
    encoder = encoder.to(dtype).eval().requires_grad_(False)
    tokenizer = clip_tokenizer()
    prompts = [r["prompt"] for r in load_records("shapes", "train")][: scale.perturb_prompts]
    ids = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    ids = ids.to(device)
    with torch.no_grad():
        token_embeds = encoder.text_model.embeddings.token_embedding(ids)
    mask = content_mask(
        ids, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id
    )

    def embed_fn(batch: torch.Tensor) -> torch.Tensor:
        rows = ids.repeat_interleave(batch.shape[0] // len(prompts), dim=0)
        with token_embeddings_replaced(encoder, batch):
            return encoder(rows).text_embeds

    num_params = sum(p.numel() for p in encoder.parameters())
    variants = scale.perturb_variants
    generator = torch.Generator().manual_seed(0)
    times: dict[str, float] = {}
    with _timed(times, "warmup_s"):
        optimize_perturbations(embed_fn, token_embeds, mask, variants, PerturbConfig(num_steps=2), generator)
    _reset_peak()
    config = PerturbConfig(num_steps=scale.perturb_steps)
    with _timed(times, "perturb_s"):
        result = optimize_perturbations(embed_fn, token_embeds, mask, variants, config, generator)
    return {
        "encoder": f"CLIPTextModelWithProjection, {num_params / 1e6:.1f}M parameters, {dtype}",
        "prompts": len(prompts),
        "variants_per_prompt": variants,
        "adam_steps": config.num_steps,
        "seconds": times["perturb_s"],
        "seconds_per_step": times["perturb_s"] / config.num_steps,
        "cos_anchor_mean": result.stats().get("perturb/cos_anchor_mean"),
        **_memory(),
    }


PART_FUNCTIONS: dict[str, Callable[[Scale], dict[str, Any]]] = {
    "policy_bf16": part_policy_bf16,
    "nft_style_fp16": part_nft_style_fp16,
    "perturb": part_perturb,
}


# -- orchestration -------------------------------------------------------------------------------------


def run_part(name: str, smoke: bool, timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.gpu_sd3", "--part", name, *(["--smoke"] if smoke else [])]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            out = json.loads(line[len(RESULT_PREFIX) :])
            out["process_s"] = round(time.perf_counter() - started, 1)
            return out
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def report(parts: dict[str, dict[str, Any]], title: str) -> None:
    from bench.common import print_table

    policy, fp16, perturb = parts["policy_bf16"], parts["nft_style_fp16"], parts["perturb"]
    rows = []
    if "rollout" in policy:
        r = policy["rollout"]
        rows.append(
            ["rollout (θ_old, bf16)", f"{r['images_per_s']:.2f} images/s", r.get("peak_gib"), r["grid"]]
        )
    for label, part in (("NFT update, bf16 (ours)", policy), ("NFT update, fp32 + fp16 autocast", fp16)):
        u = part.get("update", {})
        if u.get("samples_per_s"):
            rows.append(
                [
                    label,
                    f"{u['samples_per_s']:.3f} samples/s",
                    u.get("peak_gib"),
                    f"batch {u['train_batch_size']}",
                ]
            )
        else:
            rows.append(
                [label, part.get("error") or f"out of memory at {u.get('out_of_memory_at')}", None, ""]
            )
    if "seconds" in perturb:
        rows.append(
            [
                "perturbation (CLIP-L)",
                f"{perturb['seconds']:.1f} s",
                perturb.get("peak_gib"),
                f"{perturb['prompts']} prompts × {perturb['variants_per_prompt']} variants × "
                f"{perturb['adam_steps']} steps",
            ]
        )
    else:
        rows.append(["perturbation (CLIP-L)", perturb.get("error"), None, ""])
    print_table(title, ["what", "speed", "peak GiB", "detail"], rows, digits=1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_sd3", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="scaled-down config, runs on CPU in seconds")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--part-timeout-s", type=float, default=300.0, help="wall limit per part")
    args = p.parse_args(argv)
    scale = smoke_scale() if args.smoke else full_scale()
    if args.part is not None:
        print(RESULT_PREFIX + json.dumps(PART_FUNCTIONS[args.part](scale)), flush=True)
        return
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on a CPU, or on an H100/H200-class GPU")
    from bench.common import write_results

    started = time.perf_counter()
    parts = {}
    for name in PARTS:
        print(f"{name} ...", flush=True)
        parts[name] = run_part(name, args.smoke, args.part_timeout_s)
    title = "scaled-down smoke config (not SD3.5-M)" if args.smoke else "SD3.5-M architecture at random init"
    report(parts, title)
    policy, fp16 = parts["policy_bf16"].get("update", {}), parts["nft_style_fp16"].get("update", {})
    speedup = None
    if policy.get("samples_per_s") and fp16.get("samples_per_s"):
        speedup = policy["samples_per_s"] / fp16["samples_per_s"]
        print(f"\nNFT update, bf16 over fp32 + fp16 autocast: {speedup:.2f}×")
    write_results(
        "gpu_sd3_smoke" if args.smoke else "gpu_sd3",
        {
            "mode": "smoke (scaled-down config, not SD3.5-M)" if args.smoke else "full",
            "transformer_config": scale.transformer,
            "clip_config": scale.clip,
            "parts": parts,
            "update_bf16_over_fp16_style": speedup,
            "wall_s": round(time.perf_counter() - started, 1),
        },
    )


if __name__ == "__main__":
    main()
