"""The exported LoRA, loaded by diffusers' own ``load_lora_weights``, is the trained EMA adapter exactly."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from tests.test_trainer_e2e import run_training, tiny_config
from tests.tiny_sd3 import tiny_components, vae_less_pipeline
from trainer import checkpoint as ckpt
from trainer.model import POLICY, load_adapter_state, use_adapter


def diffusers_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """The tiny model's base weights (same seed), assembled as a user would: no adapters, no trainer code."""
    parts = tiny_components(seed=seed)
    text = parts["text"]
    return vae_less_pipeline(
        parts["transformer"],
        parts["scheduler"],
        text.text_encoder,
        text.tokenizer,
        text.text_encoder_2,
        text.tokenizer_2,
    )


def velocity(transformer, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def test_the_latest_lora_path_loads_at_the_trained_strength(tmp_path: Path) -> None:
    """r 4, alpha 8 (alpha ≠ r): without alpha in the export, diffusers would apply half the update."""
    run_dir = tmp_path / "run"
    trainer = asyncio.run(run_training(tiny_config(tmp_path, iterations=2), run_dir))
    lora = run_dir / "checkpoints" / "latest" / "lora"
    assert os.readlink(run_dir / "checkpoints" / "latest") == "iter-000002"

    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, 3, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(2, 6, 48, generator=generator),
        "pooled_projections": torch.randn(2, 40, generator=generator),
        "timestep": torch.tensor([250.0, 750.0]),
    }
    transformer = trainer.model.transformer
    load_adapter_state(transformer, POLICY, trainer.policy.ema)
    use_adapter(transformer, POLICY)
    trained = velocity(transformer, inputs)

    pipe = diffusers_pipeline()
    base = velocity(pipe.transformer, inputs)
    pipe.load_lora_weights(str(lora))
    loaded = velocity(pipe.transformer, inputs)

    change = (trained - base).norm() / base.norm()
    assert change > 1e-3, f"the EMA adapter should move the velocity (relative change {change:.2e})"
    ratio = ((loaded - base) * (trained - base)).sum() / (trained - base).square().sum()
    assert abs(ratio - 1) < 1e-4, f"loaded LoRA applies {ratio:.4f}× the trained update"
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-6)


def test_runs_written_with_a_text_latest_pointer_still_resolve(tmp_path: Path) -> None:
    """Earlier runs wrote ``latest`` as a one-line file; resume and evaluation still find the checkpoint."""
    root = tmp_path / "run" / "checkpoints"
    (root / "iter-000003").mkdir(parents=True)
    (root / "iter-000003" / "state.json").write_text("{}")
    (root / "latest").write_text("iter-000003\n")
    assert ckpt.resolve(tmp_path / "run") == root / "iter-000003"
    ckpt._point_latest(root, "iter-000003")  # the next save turns it into the symlink
    assert os.readlink(root / "latest") == "iter-000003"
    assert ckpt.resolve(root) == root / "iter-000003"


def test_an_adapter_is_never_exported_without_its_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="alpha"):
        ckpt.save_checkpoint(
            tmp_path,
            state=ckpt.TrainerState(1, 1, {}, {}),
            adapters={},
            optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
            generators={},
            lora_export={"a.lora_A.weight": torch.zeros(1, 1)},
        )
    assert not any(tmp_path.iterdir())
