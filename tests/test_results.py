"""The study report's exploration statistic, on crafted reward logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from trainer.results import equal_across_conditions


def write_rewards(path: Path, rows: list[tuple[int, str, int, int, float]]) -> Path:
    """Rows (iteration, prompt, noise, condition, reward) in rollout order; samples numbered per iteration."""
    keys = ("iteration", "prompt", "noise", "condition", "reward")
    lines, sample, last = [], 0, None
    for row in rows:
        sample = 0 if row[0] != last else sample + 1
        last = row[0]
        lines.append(json.dumps({**dict(zip(keys, row, strict=True)), "sample": sample}) + "\n")
    path.write_text("".join(lines))
    return path


def test_cells_whose_conditions_all_tie_are_counted(tmp_path: Path):
    rows = [
        # iteration 1, prompt a: noise 0 ties over K = 3, noise 1 does not
        (1, "a", 0, 0, 0.5), (1, "a", 0, 1, 0.5), (1, "a", 0, 2, 0.5),
        (1, "a", 1, 0, 0.5), (1, "a", 1, 1, 1.0), (1, "a", 1, 2, 0.5),
        # iteration 2, same prompt and noise index: a separate cell, ties
        (2, "a", 0, 0, 0.0), (2, "a", 0, 1, 0.0), (2, "a", 0, 2, 0.0),
        # prompt b: differs
        (2, "b", 0, 0, 0.0), (2, "b", 0, 1, 0.25), (2, "b", 0, 2, 0.0),
        # prompt a drawn a second time in iteration 2: its own cell, which ties
        (2, "a", 0, 0, 1.0), (2, "a", 0, 1, 1.0), (2, "a", 0, 2, 1.0),
    ]  # fmt: skip
    assert equal_across_conditions(write_rewards(tmp_path / "r.jsonl", rows)) == 3 / 5


def test_one_condition_per_noise_has_no_cells(tmp_path: Path):
    rows = [(1, "a", g, 0, 0.0) for g in range(4)] + [(1, "a", g, 0, 0.0) for g in range(4)]  # a drawn twice
    assert math.isnan(equal_across_conditions(write_rewards(tmp_path / "r.jsonl", rows)))
