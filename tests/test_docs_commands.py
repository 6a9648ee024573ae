"""The commands README.md and docs/deploy.md tell users to paste, run as written.

Each test takes its commands from the document itself (a fenced block found by a phrase in it), so a
doc edit that breaks a command breaks the test. Substitutions are only those a fresh clone forces: the
venv's python for ``.venv/bin/python`` (the commands run in a scratch directory) and a free port for
50051. What needs a cluster, Docker or a GPU (``kubectl apply``, ``docker build``, real checkpoints) is
checked elsewhere: manifests by tests/test_k8s.py, the image's pieces by hadolint and the registry test.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.core.auth import TokenAuthenticator
from services.core.server import READY_PREFIX
from trainer import run as trainer_run
from trainer.config import TrainConfig, build_config

ROOT = Path(__file__).resolve().parents[1]


def block(doc: str, phrase: str) -> list[str]:
    """The commands of the fenced shell block of ``doc`` that contains ``phrase`` (continuations joined)."""
    text = (ROOT / doc).read_text()
    for body in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        if phrase in body:
            return [line for line in body.replace("\\\n", " ").splitlines() if line.strip()]
    raise AssertionError(f"{doc} has no shell block containing {phrase!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_here(command: str, port: int | None = None) -> str:
    command = command.replace(".venv/bin/python", shlex.quote(sys.executable))
    return command if port is None else command.replace("50051", str(port))


def bash(command: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_readme_serving_example_runs_as_written(tmp_path: Path) -> None:
    port = free_port()
    lines = [as_here(line, port) for line in block("README.md", "services.client score")]
    renders = [line for line in lines if "shapes.render" in line]
    (serve,) = [line for line in lines if "services.serve" in line]
    describe, score = (
        next(line for line in lines if f"services.client {verb}" in line) for verb in ("describe", "score")
    )
    for line in renders:
        done = bash(line, tmp_path)
        assert done.returncode == 0, done.stderr
    server = subprocess.Popen(
        ["bash", "-c", f"exec {serve}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and not line.startswith(READY_PREFIX):
            line = server.stdout.readline()
            assert line or server.poll() is None, "the README's serve command exited"
        assert line.strip() == f"{READY_PREFIX}127.0.0.1:{port}"  # what the README's comment promises
        described = bash(describe, tmp_path)
        assert described.returncode == 0, described.stderr
        assert "compressibility" in described.stdout
        scored = bash(score, tmp_path)
        assert scored.returncode == 0, scored.stderr
        result = json.loads(scored.stdout)
        assert [s["image"] for s in result["scores"]] == ["a.png", "b.png"]
        assert all(isinstance(v, float) for s in result["scores"] for k, v in s.items() if k != "image")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_deploy_token_recipe_writes_a_file_the_server_accepts(tmp_path: Path) -> None:
    lines = block("docs/deploy.md", "tokens.txt")
    recipe = "\n".join(line for line in lines if not line.lstrip().startswith(("kubectl", "#")))
    done = bash(recipe, tmp_path)
    assert done.returncode == 0, done.stderr
    auth = TokenAuthenticator.from_file(tmp_path / "tokens.txt")
    tokens = dict(line.split(":")[:2] for line in (tmp_path / "tokens.txt").read_text().splitlines())
    assert sorted(tokens) == ["team-batch", "team-eval", "team-vision"]
    batch = auth.authenticate([("authorization", f"Bearer {tokens['team-batch']}")], "geneval")
    assert (batch.name, batch.models, batch.images_per_s) == ("team-batch", {"geneval", "pickscore"}, 200.0)


def training_lines() -> list[list[str]]:
    """README's ``python -m trainer.run`` lines as argument lists (the ones without a ``...`` to fill)."""
    lines = block("README.md", "python -m trainer.run")
    out = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if words[:3] == ["python", "-m", "trainer.run"] and "..." not in words:
            out.append(words[3:])
    return out


@pytest.mark.parametrize("argv", training_lines(), ids=lambda argv: " ".join(argv) or "(no flags)")
def test_readme_training_lines_resolve_to_a_valid_config(
    argv: list[str], tmp_path: Path, monkeypatch
) -> None:
    """Flags parse and the config resolves (the runs themselves are `make demo`'s and the SD3.5-M tests')."""
    monkeypatch.chdir(tmp_path)
    if "--resume" in argv:  # continue the demo's run: its saved config is what --resume reads
        run_dir = Path(argv[argv.index("--resume") + 1])
        run_dir.mkdir(parents=True)
        build_config("shapes").save(run_dir / "config.json")
    args = trainer_run.parse_args(argv)
    cfg, _ = trainer_run.resolve_config(args)
    assert isinstance(cfg, TrainConfig)
    if args.iterations is not None:
        assert cfg.run.iterations == args.iterations  # the total, as the README says


def test_readme_training_block_is_covered() -> None:
    assert len(training_lines()) >= 3  # the demo, SD3.5-M with a shared service, --resume


def test_deploy_torchserve_archive_commands_run_as_written(tmp_path: Path) -> None:
    lines = block("docs/deploy.md", "services.torchserve build compressibility")
    runnable = [
        line
        for line in lines
        if "services.torchserve" in line and "--checkpoint" not in line  # real weights: not here
    ]
    assert len(runnable) == 2, runnable  # the tiny archive, then its config
    for line in runnable:
        done = bash(as_here(line.replace("python -m", ".venv/bin/python -m", 1)), tmp_path, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "build" / "torchserve" / "compressibility.mar").is_file()
    properties = (tmp_path / "build" / "torchserve" / "config.properties").read_text()
    assert "0.0.0.0" in properties
