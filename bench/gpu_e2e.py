"""End-to-end E2PO iterations on the SD3.5-Medium architecture at random init, rewards served on the same GPU.

    python -m bench.gpu_e2e          # one H100/H200-class GPU, ≤ 8 minutes → bench/results/gpu_e2e.json
    python -m bench.gpu_e2e --tiny   # SD3.5-M's layout shrunk (bench/sd35m.py), on CPU → gpu_e2e_tiny.json

What runs is the trainer itself: ``trainer.loop.Trainer.run_iteration`` (perturb → rollout, each decoded
chunk sent to the reward service while the next is sampled → advantages → NFT update → θ_old / EMA) on the
whole SD3.5-M pipeline — transformer, CLIP-L, CLIP-G, T5-XXL (128 tokens) and the 16-channel VAE — built from
its hub configs (``bench/configs``) in bf16 with bf16 autocast, 512² images. The reward is PickScore
(ViT-H/14 CLIP architecture at random init, float32 as the scorer runs it) behind our gRPC server in the
same process and on the same GPU, so rollout and scoring share the card as they would on one node.

Both methods sample the same number of images per prompt: E2PO with G 4 × K 4 (three optimised CLIP-L
perturbations, 300 Adam steps as Table 3) and the DiffusionNFT baseline with G 16 × K 1. Reported per method:
samples/s per GPU over whole iterations, the time of each phase (perturbation, rollout sampling, VAE decode,
reward wait after the last chunk, update) and the peak GPU memory, after one untimed warm-up iteration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import RESULTS, model_config, print_table, write_results
from bench.sd35m import SD35MConfigs, full_configs, sd35m_pipeline, tiny_configs
from services.core.server import RewardServer, ServerConfig
from services.pickscore import PickScoreScorer
from shapes.prompts import all_metadata
from trainer.config import TrainConfig, build_config
from trainer.loop import Trainer
from trainer.model import FlowModel, ModelConfig, assemble
from trainer.rewards import RewardSet, RewardSpec
from trainer.text import SD3TextEncoder

PHASES = ("perturb", "rollout", "decode", "reward_wait", "update", "iteration")


@dataclass(frozen=True, kw_only=True)
class Scale:
    """Sizes of one run: the real ones on a GPU, or the tiny layout's on a CPU."""

    configs: Callable[[], SD35MConfigs]
    resolution: int
    dtype: torch.dtype
    mixed_precision: str
    num_prompts: int
    num_noises: int
    num_conditions: int
    rollout_steps: int
    perturb_steps: int
    rollout_batch: int
    train_batch: int
    timed_iterations: int


FULL = Scale(
    configs=full_configs,
    resolution=512,
    dtype=torch.bfloat16,
    mixed_precision="bf16",
    num_prompts=2,
    num_noises=4,
    num_conditions=4,
    rollout_steps=10,
    perturb_steps=300,
    rollout_batch=16,
    train_batch=8,
    timed_iterations=2,
)
TINY = Scale(
    configs=tiny_configs,
    resolution=64,
    dtype=torch.float32,
    mixed_precision="no",
    num_prompts=2,
    num_noises=2,
    num_conditions=4,
    rollout_steps=2,
    perturb_steps=2,
    rollout_batch=8,
    train_batch=8,
    timed_iterations=1,
)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def flow_model(scale: Scale, device: torch.device) -> tuple[FlowModel, dict[str, float]]:
    """The SD3.5-M pipeline at random init as the trainer's FlowModel, and each component's parameters (M)."""
    pipe = sd35m_pipeline(scale.configs(), device=device, dtype=scale.dtype)
    model_config = ModelConfig(
        path="random-init", dtype="bfloat16" if scale.dtype == torch.bfloat16 else "float32",
        resolution=scale.resolution, lora_rank=32, lora_alpha=64,
    )  # fmt: skip
    text = SD3TextEncoder(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        tokenizer_2=pipe.tokenizer_2,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer_3=pipe.tokenizer_3,
        text_encoder_3=pipe.text_encoder_3,
        joint_attention_dim=pipe.transformer.config.joint_attention_dim,
        max_sequence_length=model_config.max_sequence_length,
    )
    sizes = {
        name: sum(p.numel() for p in module.parameters()) / 1e6
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }
    model = assemble(pipe.transformer, pipe.scheduler, text, pipe.vae, model_config, device)
    decode = model.decode
    model.decode_seconds = 0.0  # type: ignore[attr-defined]

    def timed_decode(x0: torch.Tensor) -> torch.Tensor:
        _sync()
        started = time.perf_counter()
        out = decode(x0)
        _sync()
        model.decode_seconds += time.perf_counter() - started  # type: ignore[attr-defined]
        return out

    model.decode = timed_decode  # type: ignore[method-assign]
    return model, sizes


def pickscore(scale: Scale, device: torch.device) -> PickScoreScorer:
    """PickScore's ViT-H/14 CLIP at random init (the tiny CLIP on CPU), float32 as the scorer runs it."""
    if scale is TINY:
        return PickScoreScorer.build(tiny=True, device=str(device))
    from transformers import CLIPConfig, CLIPModel

    from services.clip_shared.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        model = CLIPModel(CLIPConfig(**model_config("pickscore_clip_vit_h.json")))
    return PickScoreScorer(model, clip_tokenizer(), checkpoint_sha256="random-init", device=str(device))


def train_config(scale: Scale, method: str, prompts: Path, endpoint: str) -> TrainConfig:
    cfg = build_config("geneval-k12", baseline="nft" if method == "nft" else "e2po")
    cfg.data.train = cfg.data.test = str(prompts)
    cfg.data.num_prompts = scale.num_prompts
    g, k = scale.num_noises, scale.num_conditions
    cfg.rollout.num_noises, cfg.rollout.num_conditions = (g * k, 1) if method == "nft" else (g, k)
    cfg.rollout.num_steps = scale.rollout_steps
    cfg.rollout.batch_size = scale.rollout_batch
    cfg.perturb.num_steps = scale.perturb_steps
    cfg.optim.train_batch_size = scale.train_batch
    cfg.optim.mixed_precision = scale.mixed_precision
    cfg.reward.rewards = [RewardSpec(name="pickscore", output="pickscore", endpoint=endpoint)]
    return cfg


async def run_method(
    scale: Scale, method: str, model: FlowModel, prompts: Path, endpoint: str
) -> dict[str, Any]:
    cfg = train_config(scale, method, prompts, endpoint)
    rewards = RewardSet(cfg.reward)
    await rewards.connect()
    rows = []
    peak = None
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(cfg, model, rewards, Path(run_dir))
            try:
                for i in range(1 + scale.timed_iterations):  # the first pays one-off costs
                    if i == 1 and torch.cuda.is_available():
                        torch.cuda.reset_peak_memory_stats()
                    model.decode_seconds = 0.0  # type: ignore[attr-defined]
                    metrics = (await trainer.run_iteration()).metrics
                    if i == 0:
                        continue
                    row = {phase: float(metrics[f"time/{phase}"]) for phase in PHASES if phase != "decode"}
                    row["decode"] = model.decode_seconds  # type: ignore[attr-defined]
                    row["rollout"] -= row["decode"]  # the trainer's rollout timer includes the decode
                    rows.append(row)
                if torch.cuda.is_available():
                    peak = torch.cuda.max_memory_allocated() / 2**30
            finally:
                trainer.log.close()
    finally:
        await rewards.close()
    samples = cfg.data.num_prompts * cfg.rollout.num_noises * cfg.rollout.num_conditions
    mean = {f"{phase}_s": float(np.mean([r[phase] for r in rows])) for phase in PHASES}
    return {
        "method": method,
        "G": cfg.rollout.num_noises,
        "K": cfg.rollout.num_conditions,
        "samples_per_iteration": samples,
        "samples_per_s_per_gpu": samples / mean["iteration_s"],
        **mean,
        "peak_gib": peak,
        "each_iteration": rows,
    }


async def run(scale: Scale) -> dict[str, Any]:
    device = torch.device("cuda" if scale is FULL else "cpu")
    started = time.perf_counter()
    model, sizes = flow_model(scale, device)
    scorer = pickscore(scale, device)
    build_s = time.perf_counter() - started
    print(f"built the pipeline and the reward model in {build_s:.0f} s; parameters (M): {sizes}", flush=True)
    server = RewardServer(lambda: scorer, "pickscore", ServerConfig(port=0))
    port = await server.start()
    try:
        with tempfile.TemporaryDirectory() as directory:
            prompts = Path(directory) / "prompts.jsonl"
            records = [r for tag in ("counting", "colors", "position") for r in all_metadata(tag)[:4]]
            prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
            methods = []
            for method in ("e2po", "nft"):
                methods.append(await run_method(scale, method, model, prompts, f"127.0.0.1:{port}"))
                print(f"  {method}: {methods[-1]['samples_per_s_per_gpu']:.2f} samples/s", flush=True)
    finally:
        await server.drain()
    return {
        "scale": "full" if scale is FULL else "tiny",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(scale.dtype),
        "resolution": scale.resolution,
        "parameters_millions": sizes,
        "build_s": build_s,
        "total_s": time.perf_counter() - started,
        "methods": methods,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_e2e", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny SD3.5-M layout on CPU (a check, not a number)"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    scale = TINY if args.tiny else FULL
    if scale is FULL and not torch.cuda.is_available():
        parser.error("the full benchmark needs a CUDA GPU; --tiny runs the same code on CPU")
    result = asyncio.run(run(scale))
    print_table(
        f"E2PO vs DiffusionNFT, full iterations on {result['device']} ({result['scale']} SD3.5-M, "
        f"{scale.resolution}², {result['dtype']})",
        ["method", "G×K", "samples/s/GPU", *(f"{p} s" for p in PHASES), "peak GiB"],
        [
            [
                m["method"],
                f"{m['G']}×{m['K']}",
                m["samples_per_s_per_gpu"],
                *(m[f"{p}_s"] for p in PHASES),
                m["peak_gib"],
            ]
            for m in result["methods"]
        ],
        digits=2,
    )
    write_results("gpu_e2e_tiny" if args.tiny else "gpu_e2e", result, args.results_dir)
    return result


if __name__ == "__main__":
    main()
