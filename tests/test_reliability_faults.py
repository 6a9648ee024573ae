"""Faults during training: the reward server killed mid-request, the trainer killed mid-iteration, and a
checkpoint directory that fills up or turns read-only.

The first two drive ``python -m trainer.run`` as a user would, on a tiny model: the shipped shapes
model when it is present, otherwise a tiny SD3 pipeline written to disk from tests/tiny_sd3.py (the
same loader reads both). The reward is the weight-free compressibility service, which is
deterministic, so two runs can be compared bit for bit.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_reliability_fuzz import report, server_process
from tests.test_trainer_e2e import PROMPTS, run_training, tiny_config
from trainer import checkpoint as ckpt
from trainer.model import SHAPES_MODEL

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 8
SMALL_RUN = [
    "data.num_prompts=2",
    "rollout.num_noises=2",
    "rollout.num_conditions=3",
    "rollout.num_steps=4",
    "rollout.batch_size=5",  # chunks straddle prompts: exercises reassembly after retries
    "perturb.num_steps=5",
    "optim.train_batch_size=4",
    "run.checkpoint_every=1",
    "run.plot_every=0",
    "run.device=cpu",
    "reward.timeout_s=120",
]


# -- a trainer subprocess ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    """``--model`` and overrides for a small, fast run: the shipped shapes model if present."""
    if (SHAPES_MODEL / "transformer").is_dir():
        return ["--model", "shapes"]
    from tests.tiny_sd3 import tiny_components

    root = tmp_path_factory.mktemp("tiny-pipeline")
    parts = tiny_components()
    parts["transformer"].save_pretrained(root / "model" / "transformer")
    parts["scheduler"].save_pretrained(root / "model" / "scheduler")
    text = parts["text"]
    for suffix, tokenizer, encoder in (
        ("", text.tokenizer, text.text_encoder),
        ("_2", text.tokenizer_2, text.text_encoder_2),
    ):
        tokenizer.save_pretrained(root / "model" / f"tokenizer{suffix}")
        encoder.save_pretrained(root / "model" / f"text_encoder{suffix}")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    overrides = [
        f"data.train={prompts}",
        f"data.test={prompts}",
        "model.lora_rank=4",
        "model.lora_alpha=8",
        "model.max_sequence_length=4",
    ]
    return ["--model", str(root / "model"), *(a for o in overrides for a in ("--set", o))]


def trainer_command(
    run_dir: Path, endpoint: str, model_args: list[str], *, resume: bool = False
) -> list[str]:
    cmd = [sys.executable, "-m", "trainer.run", "--iterations", str(ITERATIONS)]
    if resume:
        return [*cmd, "--resume", str(run_dir), "--reward-endpoint", f"compressibility={endpoint}"]
    cmd += ["--out", str(run_dir), "--reward-endpoint", f"compressibility={endpoint}", *model_args]
    return [*cmd, *(a for o in SMALL_RUN for a in ("--set", o))]


@contextmanager
def trainer(cmd: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def iterations_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def reward_rows(run_dir: Path) -> dict[int, list[int]]:
    rows = [json.loads(line) for line in (run_dir / "rewards.jsonl").read_text().splitlines()]
    per_iteration: dict[int, list[int]] = {}
    for row in rows:
        per_iteration.setdefault(row["iteration"], []).append(row["sample"])
    return per_iteration


def queued_images(metrics_endpoint: str) -> int:
    text = urllib.request.urlopen(f"http://{metrics_endpoint}/metrics", timeout=5).read().decode()
    return int(
        sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("reward_queue_images{"))
    )


def final_adapters(run_dir: Path) -> dict:
    return load_file(ckpt.resolve(run_dir) / "adapters.safetensors")


# -- reward server killed mid-request -------------------------------------------------------------


@pytest.mark.reliability
def test_reward_server_sigkilled_mid_request_and_restarted_loses_and_doubles_nothing(
    tmp_path: Path, model_args: list[str]
) -> None:
    port, metrics_port = free_port(), free_port()
    # Every chunk waits 300 ms in the queue, so a kill at a moment with queued images is mid-request.
    serve_args = ["compressibility", "--max-delay-ms", "300", "--max-batch-images", "512"]
    serve_args += ["--metrics-port", str(metrics_port), "--log-level", "WARNING"]
    metrics_endpoint = f"127.0.0.1:{metrics_port}"
    run_dir = tmp_path / "run"
    kills = []
    with server_process(tmp_path / "server.log", *serve_args, port=port) as first:
        cmd = trainer_command(run_dir, f"127.0.0.1:{port}", model_args)
        with trainer(cmd, tmp_path / "trainer.log") as proc:
            wait_for(lambda: iterations_logged(run_dir) >= 2, 300, "two iterations", proc)
            wait_for(lambda: queued_images(metrics_endpoint) > 0, 60, "a queued reward request", proc)
            kills.append(iterations_logged(run_dir))
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
            time.sleep(1.0)  # the trainer sees a dead endpoint for a while
            with server_process(tmp_path / "server2.log", *serve_args, port=port) as second:
                wait_for(lambda: iterations_logged(run_dir) >= kills[0] + 2, 300, "progress", proc)
                wait_for(lambda: queued_images(metrics_endpoint) > 0, 60, "a queued reward request", proc)
                kills.append(iterations_logged(run_dir))
                second.proc.send_signal(signal.SIGKILL)
                second.proc.wait(10)
                with server_process(tmp_path / "server3.log", *serve_args, port=port):
                    assert proc.wait(600) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    per_iteration = reward_rows(run_dir)
    assert sorted(per_iteration) == list(range(1, ITERATIONS + 1))
    num_samples = len(per_iteration[1])
    for samples in per_iteration.values():
        assert sorted(samples) == list(range(num_samples))  # each sample exactly once, none missing
    report(
        "fault-reward-server-kill",
        server_kills=len(kills),
        killed_during_iterations=[k + 1 for k in kills],
        iterations=ITERATIONS,
        samples_per_iteration=num_samples,
        rows=sum(map(len, per_iteration.values())),
    )


# -- trainer killed mid-iteration -----------------------------------------------------------------


@pytest.mark.reliability
def test_trainer_sigkilled_mid_iteration_resumes_to_the_same_final_weights(
    tmp_path: Path, model_args: list[str]
) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    with server_process(tmp_path / "server.log", "compressibility", "--log-level", "WARNING") as server:
        with trainer(
            trainer_command(straight, server.endpoint, model_args), tmp_path / "straight.log"
        ) as proc:
            assert proc.wait(600) == 0, (tmp_path / "straight.log").read_text()[-3000:]
        kill_points = []
        cmd = trainer_command(split, server.endpoint, model_args)
        for target in (2, 5):  # kill twice: after a resume, too
            with trainer(cmd, tmp_path / "split.log") as proc:
                # Mid-iteration: the iteration after `target` has started (its log line is not written).
                wait_for(lambda t=target: iterations_logged(split) >= t, 300, f"iteration {target}", proc)
                time.sleep(0.3)
                assert proc.poll() is None, "the run finished before it could be killed"
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            kill_points.append(iterations_logged(split))
            cmd = trainer_command(split, server.endpoint, model_args, resume=True)
        with trainer(cmd, tmp_path / "split.log") as proc:
            assert proc.wait(600) == 0, (tmp_path / "split.log").read_text()[-3000:]
    a, b = final_adapters(straight), final_adapters(split)
    assert set(a) == set(b)
    for key in a:
        assert a[key].equal(b[key]), key  # θ, θ_old and EMA, bit for bit
    assert (ckpt.resolve(straight) / "adapters.safetensors").read_bytes() == (
        ckpt.resolve(split) / "adapters.safetensors"
    ).read_bytes()

    def metrics(run: Path) -> list[dict]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    assert metrics(straight) == metrics(split)  # one uninterrupted history, no duplicated iteration
    assert Counter(r["iteration"] for r in metrics(split)) == Counter(range(1, ITERATIONS + 1))
    report("fault-trainer-kill", trainer_kills=len(kill_points), killed_after_iterations=kill_points)


# -- checkpoint directory full or read-only -------------------------------------------------------


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[None]:
    """A small tmpfs at ``path`` (needs root and CAP_SYS_ADMIN; the test is skipped without)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _first_iteration(tmp_path: Path, run_dir: Path) -> dict[str, str]:
    """Train iteration 1 (checkpoint iter-000001, `latest`); return the checkpoint's file digests."""
    asyncio.run(run_training(_config(tmp_path, 1), run_dir))
    assert os.readlink(run_dir / "checkpoints" / "latest") == "iter-000001"
    return _digest(run_dir / "checkpoints" / "iter-000001")


def _config(tmp_path: Path, iterations: int):
    cfg = tiny_config(tmp_path, iterations=iterations)
    cfg.run.checkpoint_every = 1
    return cfg


def _assert_previous_checkpoint_intact(run_dir: Path, before: dict[str, str]) -> None:
    root = run_dir / "checkpoints"
    assert os.readlink(root / "latest") == "iter-000001"
    assert _digest(root / "iter-000001") == before
    assert sorted(p.name for p in root.iterdir()) == ["iter-000001", "latest"]  # no half-written leftovers


def _resume_to_two(tmp_path: Path, run_dir: Path) -> None:
    asyncio.run(run_training(_config(tmp_path, 2), run_dir, resume=run_dir))
    assert os.readlink(run_dir / "checkpoints" / "latest") == "iter-000002"


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint_latest(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    with tmpfs(root, "1m"):
        before = _first_iteration(tmp_path, run_dir)
        checkpoint_bytes = sum((root / "iter-000001" / f).stat().st_size for f in before)
        free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
        filler = root / ".filler"  # leaves room for about half a checkpoint
        filler.write_bytes(b"\0" * max(0, free - checkpoint_bytes // 2))
        with pytest.raises(Exception) as info:
            asyncio.run(run_training(_config(tmp_path, 2), run_dir, resume=run_dir))
        filler.unlink()
        _assert_previous_checkpoint_intact(run_dir, before)
        _resume_to_two(tmp_path, run_dir)  # space is back: the run continues from iter-000001
    error = f"{type(info.value).__name__}: {info.value}"
    report("fault-disk-full", error=error[:200])
    assert _mentions_no_space(info.value), error[:300]
    assert "iter-000001 is intact and still latest" in str(info.value)


def _mentions_no_space(exc: BaseException) -> bool:
    while exc is not None:
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def test_checkpoint_write_failure_at_any_step_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without root: the last file write (the LoRA export) raises ENOSPC, as a full disk would."""
    run_dir = tmp_path / "run"
    before = _first_iteration(tmp_path, run_dir)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "export_lora", no_space)
    with pytest.raises(OSError) as info:
        asyncio.run(run_training(_config(tmp_path, 2), run_dir, resume=run_dir))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    _assert_previous_checkpoint_intact(run_dir, before)
    _resume_to_two(tmp_path, run_dir)


@contextmanager
def read_only_later(root: Path) -> Iterator[tuple[Callable[[], object], Callable[[], object]]]:
    """(make_read_only, make_writable) for ``root``. Root ignores permission bits, so as root the
    directory is a tmpfs remounted read-only; otherwise its mode drops the write bits."""
    if os.geteuid() != 0:
        yield (lambda: root.chmod(0o555)), (lambda: root.chmod(0o755))
        return
    with tmpfs(root, "1m"):
        yield (
            lambda: subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True),
            lambda: subprocess.run(["mount", "-o", "remount,rw", str(root)], check=True),
        )


def test_read_only_checkpoint_dir_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    root.mkdir(parents=True)
    with read_only_later(root) as (make_read_only, make_writable):
        before = _first_iteration(tmp_path, run_dir)
        make_read_only()
        with pytest.raises(OSError) as info:
            asyncio.run(run_training(_config(tmp_path, 2), run_dir, resume=run_dir))
        make_writable()
        assert info.value.errno in (errno.EROFS, errno.EACCES)
        assert str(root) in str(info.value)  # the message names the directory
        _assert_previous_checkpoint_intact(run_dir, before)
        _resume_to_two(tmp_path, run_dir)
