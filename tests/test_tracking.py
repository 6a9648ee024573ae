"""The run log reads as one run whatever stopped it: rows an interrupted attempt wrote are dropped when
the run resumes from a checkpoint, or starts over because it had none."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.tracking import RunLog


def rows(path: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines()]


def write_attempt(run_dir: Path, iterations: int) -> None:
    log = RunLog(run_dir, tensorboard=False)
    for i in range(1, iterations + 1):
        log.log(i, {"reward_mean": float(i)})
        log.log_samples(i, [{"sample": 0, "reward": float(i)}])
    log.close()


def test_a_fresh_start_drops_an_earlier_attempt_without_checkpoint(tmp_path: Path) -> None:
    write_attempt(tmp_path, 3)  # stopped before its first checkpoint
    write_attempt(tmp_path, 2)  # the run starts over from iteration 0
    assert rows(tmp_path / "metrics.jsonl") == [1, 2]
    assert rows(tmp_path / "rewards.jsonl") == [1, 2]


def test_a_resumed_run_keeps_the_iterations_its_checkpoint_holds(tmp_path: Path) -> None:
    write_attempt(tmp_path, 4)
    log = RunLog(tmp_path, resume_iteration=2, tensorboard=False)
    log.log(3, {"reward_mean": 30.0})
    log.close()
    assert rows(tmp_path / "metrics.jsonl") == [1, 2, 3]
    assert [r["reward_mean"] for r in log.history] == [1.0, 2.0, 30.0]
