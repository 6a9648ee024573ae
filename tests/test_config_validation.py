"""Every config section refuses a bad value wherever it comes from (preset code, ``--set``, a saved
config.json, server flags), naming the field, the value and the allowed range, before any model loads."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services import server_args
from trainer.config import PRESETS, TrainConfig, build_config

ROOT = Path(__file__).resolve().parents[1]

BAD_OVERRIDES = {
    "model.lora_rank=0": "model.lora_rank = 0 is out of range: must be > 0",
    "model.dtype=float8": "'float8' is not one of",
    "model.path=": "model.path = '' is out of range",
    "data.num_prompts=0": "data.num_prompts = 0 is out of range: must be > 0",
    "data.train_tags=colors,colours": "data.train_tags = ('colors', 'colours') is out of range: must be Gen",
    "model.scheduler_shift=0": "model.scheduler_shift = 0.0 is out of range: must be > 0",
    "perturb.max_norm=-1": "perturb.max_norm = -1.0 is out of range: must be > 0",
    "perturb.lr=0": "perturb.lr = 0.0 is out of range: must be > 0",
    "perturb.anchor_mu=1.5": "perturb.anchor_mu = 1.5 is out of range: must be a cosine in [-1, 1]",
    "perturb.lambda_div=-1": "perturb.lambda_div = -1.0 is out of range: must be >= 0",
    "rollout.num_noises=0": "rollout.num_noises = 0 is out of range: must be > 0",
    "rollout.rho=1.5": "rollout.rho = 1.5 is out of range: must be in [0, 1]",
    "nft.nft_beta=0": "nft.nft_beta = 0.0 is out of range: must be > 0",
    "nft.kl_weight=-1e-4": "nft.kl_weight = -0.0001 is out of range: must be >= 0",
    "nft.train_timestep_fraction=1.5": "nft.train_timestep_fraction = 1.5 is out of range: must be in (0, 1]",
    "optim.lr=-5": "optim.lr = -5.0 is out of range: must be > 0",
    "optim.lr=nan": "optim.lr = nan is out of range: must be > 0",
    "optim.betas=0.9,1.0": "optim.betas = (0.9, 1.0) is out of range: must be two values in [0, 1)",
    "reward.timeout_s=0": "reward.timeout_s = 0.0 is out of range: must be > 0",
    "run.checkpoint_every=0": "run.checkpoint_every = 0 is out of range: must be > 0",
    "run.iterations=-3": "run.iterations = -3 is out of range: must be >= 0",
}


def test_every_preset_and_its_baseline_is_valid() -> None:
    for preset in PRESETS:
        for baseline in ("e2po", "nft"):
            build_config(preset, baseline=baseline).validate()


@pytest.mark.parametrize("override", sorted(BAD_OVERRIDES))
def test_a_bad_set_names_the_field_the_value_and_the_range(override: str) -> None:
    with pytest.raises(ValueError) as info:
        build_config("shapes", overrides=[override])
    assert BAD_OVERRIDES[override] in str(info.value)
    assert str(info.value).startswith(f"--set {override}") or "is not one of" in str(info.value)


def test_an_edited_config_json_is_refused_on_load(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    data = build_config("shapes").to_dict()
    data["nft"]["adv_clip"] = -5.0
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config\.json: nft\.adv_clip = -5\.0 is out of range: must be > 0"):
        TrainConfig.load(path)
    data["nft"]["adv_clip"] = 5.0
    data["rollout"]["sampler"] = "ddim"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"rollout\.sampler = 'ddim' is out of range: must be one of"):
        TrainConfig.load(path)


def test_the_trainer_refuses_a_bad_value_before_loading_anything(tmp_path: Path) -> None:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.run", "--preset", "shapes", "--out", str(tmp_path / "run"),
         "--set", "optim.lr=-5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --set optim.lr=-5: optim.lr = -5.0 is out of range: must be > 0"
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - started < 60


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--stream-idle-timeout-s", "0"], "stream_idle_timeout_s must be > 0"),
        (["--max-streams-per-client", "0"], "max_streams_per_client must be >= 1"),
        (["--max-buffered-request-bytes", "1000"], "max_buffered_request_bytes (1000) must be >="),
        (["--max-concurrent-rpcs", "0"], "max_concurrent_rpcs must be >= 1"),
        (["--max-pixels-per-request", "10"], "must be >= the per-image max_pixels"),
        (["--max-request-bytes", "10"], "max_request_bytes must be >= 1024, got 10"),
        (["--max-images-per-request", "0"], "max_images_per_request must be >= 1, got 0"),
    ],
)
def test_server_flags_are_validated_before_binding(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        server_args.config_from_args(server_args.parse_args(["compressibility", *flags]))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-request-bytes", "10"], "max_request_bytes must be >= 1024, got 10"),
        (["--max-pixels", "0"], "max_pixels and max_side must be >= 1"),
        (["--max-batch-images", "0"], "max_batch_images must be >= 1, got 0"),
        (["--max-delay-ms", "-5"], "max_delay_ms must be >= 0, got -5.0"),
    ],
)
def test_torchserve_builder_flags_are_validated(
    flags: list[str], message: str, tmp_path: Path, capsys
) -> None:
    from services.torchserve.__main__ import main as torchserve_main

    assert torchserve_main(["build", "compressibility", "--tiny", "--out", str(tmp_path), *flags]) != 0
    assert capsys.readouterr().err.strip().startswith(f"error: {message}")
    assert not list(tmp_path.iterdir())  # no archive written
