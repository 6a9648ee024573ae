"""The SD3.5-M path, rehearsed on a tiny pipeline in stabilityai/stable-diffusion-3.5-medium's hub layout.

The trainer loads the directory as it would load the real model, and everything it hands to or takes from
diffusers is compared with diffusers' own ``StableDiffusion3Pipeline`` opened on the same directory: the
conditioning (CLIP-L ‖ CLIP-G padded to T5's width, then T5's tokens), the Euler rollout on the anchor
condition, the VAE decode with SD3.5's scaling and shift, and the exported LoRA. ``python -m trainer.run
--preset geneval-k12 --model DIR`` then runs 2 iterations and a resume against a GenEval service.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from services.geneval.scorer import OUTPUTS as GENEVAL_OUTPUTS
from services.geneval.scorer import GenEvalScorer
from shapes.prompts import all_metadata
from tests.conftest import running_server
from tests.sd35m_layout import (
    JOINT_ATTENTION_DIM,
    POOLED_DIM,
    RESOLUTION,
    SCALING_FACTOR,
    SHIFT_FACTOR,
    write_tiny_sd35m,
)
from trainer.config import build_config
from trainer.model import POLICY, load_adapter_state, load_model, use_adapter
from trainer.rollout import denoise, inference_sigmas

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of two red circles", "a photo of a blue square left of a green triangle"]
MAX_SEQUENCE_LENGTH = build_config("geneval-k12").model.max_sequence_length


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd35m(tmp_path_factory.mktemp("sd35m") / "stable-diffusion-3.5-medium")


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def preset_model(model_dir: Path, sampler: str = "euler"):
    """geneval-k12's model and rollout config on the fixture, sizes changed only where they must be."""
    cfg = build_config("geneval-k12", overrides=["model.dtype=float32", f"model.resolution={RESOLUTION}"])
    cfg.model.path = str(model_dir)
    cfg.rollout.sampler = sampler
    return load_model(cfg.model, "cpu"), cfg


def test_fixture_has_sd35m_layout_and_classes(model_dir: Path, pipe: StableDiffusion3Pipeline) -> None:
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (SCALING_FACTOR, SHIFT_FACTOR)
    assert pipe.transformer.config.qk_norm == "rms_norm" and pipe.transformer.config.dual_attention_layers
    assert pipe.scheduler.config.shift == 3.0
    assert pipe.tokenizer_3("a red circle").input_ids[-1] == pipe.tokenizer_3.eos_token_id == 1


def test_conditioning_equals_the_pipelines_encode_prompt(
    model_dir: Path, pipe: StableDiffusion3Pipeline
) -> None:
    """Under no_grad, as the pipeline's ``__call__`` runs it (with grad on, T5's attention takes another
    kernel and moves values by ~4e-6)."""
    model, _ = preset_model(model_dir)
    assert model.text.text_encoder_3 is not None and model.sample_shape == (16, 8, 8)
    ours = model.text.encode(PROMPTS)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
    assert ours.prompt_embeds.shape == (
        2,
        77 + MAX_SEQUENCE_LENGTH,
        pipe.transformer.config.joint_attention_dim,
    )
    torch.testing.assert_close(ours.prompt_embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)
    assert ours.prompt_embeds[:, 77:].abs().sum() > 0  # the T5 slots carry T5's output, not zeros


def test_anchor_rollout_and_decode_equal_the_pipeline(
    model_dir: Path, pipe: StableDiffusion3Pipeline
) -> None:
    """Euler, guidance 1, C_orig for every sample, same noise: latents bit for bit, decoded images."""
    model, cfg = preset_model(model_dir, sampler="euler")
    num_steps = 4
    noise = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = model.text.encode(PROMPTS)
    ours = denoise(
        model,
        noise.clone(),
        cond,
        cond,
        torch.zeros(2, dtype=torch.bool),
        inference_sigmas(model, num_steps),
        cfg.rollout,
    )
    common = {
        "prompt": PROMPTS,
        "latents": noise.clone(),
        "num_inference_steps": num_steps,
        "guidance_scale": 1.0,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "height": RESOLUTION,
        "width": RESOLUTION,
    }
    latents = pipe(**common, output_type="latent").images
    torch.testing.assert_close(ours, latents, rtol=0, atol=0)
    images = pipe(**common, output_type="pt").images
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION)
    # Decoded pixels agree to float rounding (measured 2e-6), far below one grey level (1/255).
    torch.testing.assert_close(model.decode(ours), images, rtol=0, atol=1e-5)


def test_a_directory_missing_a_component_names_it(model_dir: Path, tmp_path: Path) -> None:
    for component in ("text_encoder_3", "vae", "transformer"):
        broken = tmp_path / f"without-{component}"
        shutil.copytree(model_dir, broken)
        shutil.rmtree(broken / component)
        cfg = build_config("geneval-k12", overrides=["model.dtype=float32"])
        cfg.model.path = str(broken)
        with pytest.raises(ValueError, match=rf"missing component\(s\) {component}/"):
            load_model(cfg.model, "cpu")


SMALL = [
    "model.dtype=float32",
    f"model.resolution={RESOLUTION}",
    "optim.mixed_precision=no",
    "data.num_prompts=2",
    "rollout.num_noises=2",
    "rollout.num_conditions=3",
    "rollout.num_steps=3",
    "rollout.batch_size=4",
    "perturb.num_steps=2",
    "optim.train_batch_size=4",
    "run.device=cpu",
    "run.checkpoint_every=1",
    "run.plot_every=0",
]
"""geneval-k12 shrunk by overrides only (G·K, steps, prompts, batch sizes; CPU float32)."""


async def run_cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trainer.run",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    assert proc.returncode == 0, out.decode()[-3000:]
    return out.decode()


@pytest.mark.timeout(900)
def test_geneval_k12_runs_resumes_and_exports_on_the_hub_layout(model_dir: Path, tmp_path: Path) -> None:
    records = [r for tag in ("counting", "colors", "position") for r in all_metadata(tag)[:2]]
    prompts = tmp_path / "geneval_train.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_dir = tmp_path / "run"
    data = [f"data.train={prompts}", f"data.test={prompts}"]

    async def main() -> tuple[str, str]:
        async with running_server(GenEvalScorer.build(detector="shapes"), name="geneval") as server:
            endpoint = f"geneval=127.0.0.1:{server.port}"
            common = ["--reward-endpoint", endpoint]
            first = await run_cli(
                "--preset",
                "geneval-k12",
                "--model",
                str(model_dir),
                "--iterations",
                "2",
                "--out",
                str(run_dir),
                *common,
                *(a for o in SMALL + data for a in ("--set", o)),
            )
            resumed = await run_cli("--resume", str(run_dir), "--iterations", "3", *common)
            return first, resumed

    _, resumed = asyncio.run(main())
    lora = run_dir / "checkpoints" / "latest" / "lora"
    assert f'pipe.load_lora_weights("{lora}")' in resumed
    assert os.readlink(run_dir / "checkpoints" / "latest") == "iter-000003"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["model"]["lora_rank"], config["model"]["lora_alpha"]) == (
        32,
        64,
    )  # the preset's, alpha ≠ r
    # The endpoint named no output: config.json records the one the run used, the service's first.
    assert [spec["output"] for spec in config["reward"]["rewards"]] == [GENEVAL_OUTPUTS[0]]

    # The export on this layout, through diffusers alone, equals the checkpoint's EMA adapter.
    model, _ = preset_model(model_dir)
    ema = {
        k.split("/", 1)[1]: v
        for k, v in load_file(lora.parent / "adapters.safetensors").items()
        if k.startswith("ema/")
    }
    load_adapter_state(model.transformer, POLICY, ema)
    use_adapter(model.transformer, POLICY)
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 16, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(
            2, 77 + MAX_SEQUENCE_LENGTH, JOINT_ATTENTION_DIM, generator=generator
        ),
        "pooled_projections": torch.randn(2, POOLED_DIM, generator=generator),
        "timestep": torch.tensor([300.0, 900.0]),
    }
    with torch.no_grad():
        trained = model.transformer(**inputs, return_dict=False)[0]
        pipe = StableDiffusion3Pipeline.from_pretrained(model_dir)
        base = pipe.transformer(**inputs, return_dict=False)[0]
        pipe.load_lora_weights(str(lora))
        loaded = pipe.transformer(**inputs, return_dict=False)[0]
    assert (trained - base).norm() > 1e-4 * base.norm(), "three iterations should move the EMA adapter"
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-6)
