"""bench.gpu_e2e's CPU mode: the GPU benchmark's whole path on the tiny SD3.5-M layout, so it never rots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu_e2e


def test_tiny_mode_runs_both_methods_and_writes_every_phase(tmp_path: Path) -> None:
    result = gpu_e2e.main(["--tiny", "--results-dir", str(tmp_path)])
    written = json.loads((tmp_path / "gpu_e2e_tiny.json").read_text())
    assert written["methods"] == json.loads(json.dumps(result["methods"]))
    assert set(result["parameters_millions"]) == {
        "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
    }  # fmt: skip
    e2po, nft = result["methods"]
    assert (e2po["method"], e2po["K"], nft["method"], nft["K"]) == ("e2po", 4, "nft", 1)
    assert e2po["samples_per_iteration"] == nft["samples_per_iteration"] == 2 * 2 * 4
    for method in (e2po, nft):
        for phase in gpu_e2e.PHASES:
            assert method[f"{phase}_s"] >= 0, phase
        assert method["decode_s"] > 0 and method["update_s"] > 0
        parts = sum(method[f"{p}_s"] for p in ("perturb", "rollout", "decode", "reward_wait", "update"))
        assert parts <= method["iteration_s"] * 1.001
        rate = method["samples_per_iteration"] / method["iteration_s"]
        assert method["samples_per_s_per_gpu"] == pytest.approx(rate)
