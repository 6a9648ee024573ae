"""A user error at any entry point ends in one sentence and a non-zero exit, without a traceback, within
seconds: a missing file or directory, a bad flag or value, an unreachable service."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

CASES = [
    # (argv after `python -m`, a phrase of the sentence)
    (["trainer.run", "--resume", "/nonexistent/run"], "not a run directory or one of its checkpoints"),
    (["trainer.run", "--set", "optim.lr=-5"], "optim.lr = -5.0 is out of range"),
    (
        ["trainer.run", "--out", "{tmp}/run", "--iterations", "1", "--reward-endpoint", "geneval=127.0.0.1:1",
         "--set", "reward.connect_timeout_s=2"],
        "reward 'geneval' at 127.0.0.1:1: UNAVAILABLE",
    ),
    (["trainer.evaluate", "--run", "/nonexistent/run"], "is not a run directory: it has no config.json"),
    (["trainer.experiments", "report", "--results", "/nonexistent"], "no collected runs under"),
    (["trainer.experiments", "reproduce", "--arm", "nosuch"], "no arm ['nosuch'] in study table1"),
    (["trainer.sensitivity", "--set", "bogus.field=1"], "no config section 'bogus'"),
    (["shapes.evaluate", "--model", "/nonexistent"], "is not a shapes pipeline directory"),
    (["services.serve", "compressibility", "--token-file", "/nonexistent/tokens"], "No such file"),
    (["services.serve", "compressibility", "--max-batch-images", "0"], "max_batch_images must be >= 1"),
    (["services.client", "describe", "--endpoint", "127.0.0.1:1", "--timeout", "2"], "UNAVAILABLE"),
    (
        ["services.client", "score", "--endpoint", "127.0.0.1:1", "--image", "/none.png", "--prompt", "x"],
        "No such file",
    ),
    (["services.torchserve", "build", "nosuch"], "invalid choice: 'nosuch'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "phrase"), CASES, ids=[" ".join(c[0][:2]) + f" #{i}" for i, c in enumerate(CASES)]
)
def test_a_user_error_ends_in_one_sentence(argv: list[str], phrase: str, tmp_path: Path) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False
    )
    seconds = time.monotonic() - started
    # argparse prints its usage block (a "usage:" line and indented continuations) before the sentence.
    said = [
        line
        for line in done.stderr.splitlines()
        if line.strip() and not line.startswith(("usage:", " ")) and "Loading weights" not in line
    ]
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert phrase in done.stderr, done.stderr
    # The sentence, plus at most the trainer's start-up log lines.
    assert sum(phrase in line for line in said) == 1 and len(said) <= 3, said
    assert seconds < 60
