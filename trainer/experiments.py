"""The shapes-world studies: the paper's Table 1 comparison, and ablations of E2PO's parts.

    python -m trainer.experiments reproduce [--study table1] [--seeds 8] [--extra-seeds 3] [--jobs 2]
    python -m trainer.experiments report [--study table1] [--doc docs/results.md]

``reproduce`` runs every arm as an ordinary ``python -m trainer.run`` (so what is measured is the
product, not a special path), all against one locally started GenEval service with the exact shapes
detector, then evaluates each run's EMA weights on the held-out prompts (40-step ODE, several samples
per prompt for diversity). It is resumable at any point: a finished run is skipped, an interrupted one
continues from its last checkpoint. Each finished run's compact results (its config, per-iteration
metrics, ties across K, held-out evaluation) are copied to ``results/STUDY/ARM/seed-N/``, the part to
commit; ``report`` reads only that folder, so docs/results.md and its plots regenerate from git.

A seed fixes the prompts and their order for every arm (``run.seed``), so arms are paired by seed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from trainer import children
from trainer.results import ties_across_conditions
from trainer.rewards import LocalService
from trainer.studies import RESULTS, STUDIES, Arm, Study


def run_dir(out: Path, study: Study, arm: Arm, seed: int) -> Path:
    return out / study.name / arm.name / f"seed-{seed}"


def train_command(study: Study, arm: Arm, seed: int, directory: Path, endpoint: str) -> list[str]:
    reward = ["--reward-endpoint", f"geneval={endpoint},output=geneval/score"]
    iterations = ["--iterations", str(study.iterations)]
    if (directory / "checkpoints" / "latest").exists():
        return [sys.executable, "-m", "trainer.run", "--resume", str(directory), *iterations, *reward]
    cmd = [
        sys.executable,
        "-m",
        "trainer.run",
        "--preset",
        study.preset,
        *iterations,
        "--out",
        str(directory),
    ]
    cmd += [*reward, "--set", f"run.seed={seed}"]
    if arm.baseline:
        cmd += ["--baseline", "nft"]
    for item in arm.overrides:
        cmd += ["--set", item]
    return cmd


def eval_command(directory: Path, endpoint: str, samples: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainer.evaluate",
        "--run",
        str(directory),
        "--samples-per-prompt",
        str(samples),
        "--reward-endpoint",
        f"geneval={endpoint},output=geneval/score",
    ]


def collect(directory: Path, destination: Path) -> None:
    """Copy a finished run's compact results (a few hundred kB) to ``destination``, written last-file-last
    so a folder with ``eval.json`` is complete."""
    staging = destination.with_name(destination.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copy(directory / "config.json", staging / "config.json")
    shutil.copy(directory / "metrics.jsonl", staging / "metrics.jsonl")
    ties = ties_across_conditions(directory / "rewards.jsonl")
    (staging / "ties.json").write_text(json.dumps(ties, indent=1) + "\n")
    shutil.copy(directory / "eval" / "results.json", staging / "eval.json")
    shutil.rmtree(destination, ignore_errors=True)
    staging.rename(destination)


def code_commit() -> dict[str, object]:
    """The commit the study's code is at, and whether tracked files differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "-uno"))}


def record_code(results: Path, study: Study) -> None:
    """results/STUDY/study.json: the code commit and machine every run of the study was made with (frozen
    when the study's first run starts; a later start on other code warns)."""
    path = results / study.name / "study.json"
    now = code_commit()
    if path.exists():
        frozen = json.loads(path.read_text())
        if frozen["commit"] != now["commit"] or now["dirty"]:
            print(
                f"warning: {path} froze the study at {frozen['commit'][:10]}; the code is now at "
                f"{now['commit'][:10]}{' with changes' if now['dirty'] else ''}",
                file=sys.stderr,
            )
        return
    machine = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"study": study.name, "preset": study.preset, **now, **machine}
    path.write_text(json.dumps(record, indent=2) + "\n")


def reproduce(study: Study, plan: list[tuple[Arm, int]], out: Path, results: Path, jobs: int = 1) -> None:
    """Train, evaluate and collect every run of ``plan`` not yet collected, ``jobs`` runs at a time.

    With ``jobs`` > 1 each run gets cpu_count // jobs threads: the shapes model is too small to use many
    cores in one process: on 2 cores, two 1-thread runs side by side finish ~1.8× sooner than one
    2-thread run after another (docs/results.md, Cost).
    Children are started from this (main) thread, so each dies with the study (``trainer.children``).
    """
    record_code(results, study)
    pending = []
    for arm, seed in plan:
        if (run_dir(results, study, arm, seed) / "eval.json").exists():
            print(f"[done] {arm.name} seed {seed}", flush=True)
        else:
            pending.append((arm, seed))
    env = None
    if jobs > 1:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    service = LocalService("geneval", ["--detector", "shapes"])
    endpoint = asyncio.run(service.start())
    running: dict[subprocess.Popen, tuple[Arm, int, str]] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                arm, seed = pending.pop(0)
                directory = run_dir(out, study, arm, seed)
                print(f"[train] {arm.name} seed {seed} → {directory}", flush=True)
                command = train_command(study, arm, seed, directory, endpoint)
                running[children.popen(command, env=env)] = (arm, seed, "train")
            finished = [proc for proc in running if proc.poll() is not None]
            if not finished:
                time.sleep(0.5)
                continue
            for proc in finished:
                arm, seed, stage = running.pop(proc)
                if proc.returncode != 0:
                    raise subprocess.CalledProcessError(proc.returncode, proc.args)
                directory = run_dir(out, study, arm, seed)
                if stage == "train":
                    command = eval_command(directory, endpoint, study.eval_samples)
                    running[children.popen(command, env=env, stdout=subprocess.DEVNULL)] = (arm, seed, "eval")
                else:
                    destination = run_dir(results, study, arm, seed)
                    collect(directory, destination)
                    print(f"[results] {destination}", flush=True)
    finally:
        children.stop_all(list(running))
        service.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.experiments", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="train, evaluate and collect every run of a study (resumable)")
    rep.add_argument("--study", choices=sorted(STUDIES), default="table1")
    rep.add_argument("--out", type=Path, default=Path("runs/studies"), help="run directories (not committed)")
    rep.add_argument("--results", type=Path, default=RESULTS, help="compact results (committed)")
    rep.add_argument("--seeds", type=int, help="seeds of the main arms (default: the study's)")
    rep.add_argument("--extra-seeds", type=int, help="seeds of the extra arms (default: the study's)")
    rep.add_argument("--iterations", type=int, help="per run (default: the study's)")
    rep.add_argument("--arm", action="append", default=[], help="run only these arms (by name)")
    rep.add_argument("--jobs", type=int, default=1, help="runs at a time, sharing the CPUs (default 1)")
    report = sub.add_parser("report", help="a study's results page and its plot from the committed results")
    report.add_argument("--study", choices=sorted(STUDIES), default="table1")
    report.add_argument("--results", type=Path, default=RESULTS)
    report.add_argument("--doc", type=Path, help="the page to regenerate (default: the study's own)")
    report.add_argument("--img", type=Path, default=Path("docs/img"))
    args = p.parse_args(argv)
    study = STUDIES[args.study]
    if args.command == "reproduce":
        if args.jobs < 1:
            p.error(f"--jobs must be at least 1, got {args.jobs}")
        if args.iterations is not None:
            study = Study(**{**study.__dict__, "iterations": args.iterations})
        plan = study.plan(args.seeds, args.extra_seeds)
        if args.arm:
            unknown = set(args.arm) - {arm.name for arm in study.every_arm}
            if unknown:
                p.error(f"no arm {sorted(unknown)} in study {study.name}")
            plan = [(arm, seed) for arm, seed in plan if arm.name in args.arm]
        children.stop_on_sigterm()
        try:
            reproduce(study, plan, args.out, args.results, args.jobs)
        except KeyboardInterrupt:
            print(
                f"stopped; finished runs are kept, rerun the same command to continue ({args.out})",
                file=sys.stderr,
            )
            return children.STOPPED_EXIT_CODE
        return 0
    from trainer.results import write_report

    paired = STUDIES[study.pairs_with] if study.pairs_with else None
    write_report(study, args.results, args.doc or Path(study.doc), args.img, paired)
    return 0


if __name__ == "__main__":
    sys.exit(main())
