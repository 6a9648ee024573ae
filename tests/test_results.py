"""The study report's statistics on crafted logs: ties across K, bootstrap intervals, pairing, onset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from trainer.results import (
    bootstrap_interval,
    collapse_onset,
    differences_table,
    held_out,
    paired_differences,
    ties_across_conditions,
)
from trainer.studies import Arm, Study


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
    assert ties_across_conditions(write_rewards(tmp_path / "r.jsonl", rows))["equal_across_k"] == 3 / 5


def test_one_condition_per_noise_has_no_cells(tmp_path: Path):
    rows = [(1, "a", g, 0, 0.0) for g in range(4)] + [(1, "a", g, 0, 0.0) for g in range(4)]  # a drawn twice
    assert math.isnan(ties_across_conditions(write_rewards(tmp_path / "r.jsonl", rows))["equal_across_k"])


def test_ties_per_iteration_splits_the_same_cells_by_iteration(tmp_path: Path):
    rows = [
        (1, "a", 0, 0, 0.5), (1, "a", 0, 1, 0.5),  # tie
        (1, "a", 1, 0, 0.0), (1, "a", 1, 1, 1.0),  # no tie
        (2, "a", 0, 0, 1.0), (2, "a", 0, 1, 1.0),  # tie
    ]  # fmt: skip
    path = write_rewards(tmp_path / "r.jsonl", rows)
    assert ties_across_conditions(path)["per_iteration"] == {"1": 0.5, "2": 1.0}
    assert ties_across_conditions(path)["equal_across_k"] == 2 / 3


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_seeds():
    rng = np.random.default_rng(1)
    few, many = rng.normal(0.05, 0.02, 8), rng.normal(0.05, 0.02, 200)
    mean, low, high = bootstrap_interval(few)
    assert low < mean < high and mean == pytest.approx(few.mean())
    # Independent check: the bootstrap interval of a mean is close to mean ± 1.96 · sd / sqrt(n).
    _, low_many, high_many = bootstrap_interval(many)
    half = 1.96 * many.std() / np.sqrt(many.size)
    assert (high_many - low_many) / 2 == pytest.approx(half, rel=0.1)
    assert high_many - low_many < high - low
    assert bootstrap_interval(few) == bootstrap_interval(few)  # seeded


def test_paired_differences_match_seeds_and_skip_unpaired():
    run = lambda seed, value: {"seed": seed, "eval": {"geneval/overall": value}}  # noqa: E731
    ours = [run(0, 0.30), run(1, 0.25), run(2, 0.40)]
    theirs = [run(1, 0.20), run(0, 0.10)]
    assert paired_differences(ours, theirs, held_out) == pytest.approx([0.20, 0.05])


def test_collapse_onset_is_the_first_smoothed_crossing():
    def run(ratios):
        return {"metrics": [{"iteration": i + 1, "zero_std_ratio": r} for i, r in enumerate(ratios)]}

    # A lone spike (0.6 next to zeros: smoothed 0.2) is not a collapse; iteration 6 is the first whose
    # three-iteration mean (0.3 + 0.3 + 0.4) / 3 reaches 0.3.
    assert collapse_onset(run([0.0, 0.6, 0.0, 0.0, 0.3, 0.3, 0.4])) == 6
    assert collapse_onset(run([0.1] * 10)) is None


def test_onset_differences_use_only_the_seeds_where_both_arms_collapse():
    def run(seed, ratios):
        metrics = [
            {"iteration": i + 1, "zero_std_ratio": r, "reward_mean": 0.5} for i, r in enumerate(ratios)
        ]
        return {"seed": seed, "metrics": metrics, "eval": {}}

    late, early, never = [0.0] * 7 + [0.4] * 3, [0.0, 0.0] + [0.4] * 8, [0.0] * 10
    # onsets: late 9, early 4 (the first iterations whose three-iteration mean reaches 0.3)
    a = [run(0, late), run(1, late), run(2, never)]
    b = [run(0, early), run(1, late), run(2, early)]
    study = Study(
        name="t",
        preset="shapes",
        iterations=10,
        arms=(Arm("a", "A"), Arm("b", "B")),
        seeds=3,
        comparisons=(("a", "b"),),
    )
    row = next(r for r in differences_table(study, {"a": a, "b": b}).splitlines() if "onset" in r)
    # seeds 0 and 1 give differences 9 - 4 and 9 - 9; seed 2 has no onset in arm a and is left out
    assert row.endswith("| +2.5 [+0.0, +5.0] (n=2) |")
