"""SIGTERM to an entry point stops everything it started (local reward services, trainer children)
within the drain grace; a SIGKILLed entry point's children end too (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _descendants_once(proc: subprocess.Popen, want: str, timeout_s: float = 180) -> list[psutil.Process]:
    """The process tree under ``proc`` once a descendant's command line contains ``want``."""
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited early with {proc.returncode}")
        tree = parent.children(recursive=True)
        if any(want in " ".join(p.cmdline()) for p in tree if p.is_running()):
            return tree
        time.sleep(0.2)
    pytest.fail(f"no descendant running {want!r} within {timeout_s} s")


def _gone(processes: list[psutil.Process], timeout_s: float) -> list[str]:
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return [" ".join(p.cmdline()) for p in alive]


def _signal_and_check(cmd: list[str], want: str, sig: signal.Signals, tmp_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        tree = _descendants_once(proc, want)
        proc.send_signal(sig)
        proc.wait(60)
        assert _gone(tree, 45) == [], "left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # run from tmp_path, importing this checkout
    return tmp_path


def test_sigterm_to_the_trainer_stops_its_local_reward_service(workdir: Path) -> None:
    cmd = _python("trainer.run", "--preset", "shapes", "--out", str(workdir / "run"), "--iterations", "50")
    proc = _signal_and_check(cmd, "services.serve", signal.SIGTERM, workdir)
    assert proc.returncode == 128 + signal.SIGTERM
    assert f"--resume {workdir / 'run'}" in proc.stderr.read()
    assert (workdir / "run" / "config.json").exists()  # what --resume reads


def test_sigkill_to_the_trainer_still_ends_its_local_reward_service(workdir: Path) -> None:
    cmd = _python("trainer.run", "--preset", "shapes", "--out", str(workdir / "run"), "--iterations", "50")
    _signal_and_check(cmd, "services.serve", signal.SIGKILL, workdir)


def test_sigterm_to_the_study_stops_its_trainer_and_service(workdir: Path) -> None:
    cmd = _python(
        "trainer.experiments", "reproduce", "--out", str(workdir / "study"), "--results",
        str(workdir / "results"), "--seeds", "1", "--extra-seeds", "0", "--iterations", "50",
    )  # fmt: skip
    proc = _signal_and_check(cmd, "trainer.run", signal.SIGTERM, workdir)
    assert proc.returncode == 128 + signal.SIGTERM


def test_sigterm_to_an_evaluation_stops_its_local_reward_service(workdir: Path) -> None:
    # Few prompts and steps: the service starts once the images are generated.
    cmd = _python(
        "trainer.evaluate", "--preset", "shapes", "--out", str(workdir / "eval"), "--num-prompts", "2",
        "--steps", "2", "--min-images-per-tag", "0",
    )  # fmt: skip
    proc = _signal_and_check(cmd, "services.serve", signal.SIGTERM, workdir)
    assert proc.returncode == 128 + signal.SIGTERM
