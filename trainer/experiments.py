"""The shapes-world study of E2PO vs DiffusionNFT at equal samples per prompt (paper Fig. 2/5/6/7, Table 1).

    python -m trainer.experiments reproduce [--seeds 3] [--iterations 25] [--out runs/reproduce]
    python -m trainer.experiments report [--out runs/reproduce] [--doc docs/results.md]

``reproduce`` runs every arm as an ordinary ``python -m trainer.run`` (so what is measured is the
product, not a special path), all against one locally started GenEval service with the exact shapes
detector, then evaluates each run's EMA weights on the held-out prompts (40-step ODE, several samples
per prompt for diversity). It is resumable at any point: finished runs are skipped, interrupted ones
continue from their last checkpoint. ``report`` turns the run directories into plots and tables.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from trainer import children
from trainer.rewards import LocalService


@dataclass(frozen=True)
class Arm:
    """One configuration of the study: a name, the NFT-baseline switch and config overrides."""

    name: str
    label: str
    baseline: bool = False
    overrides: tuple[str, ...] = ()


# Samples per prompt are G·K = 16 in every arm, as are prompts per iteration and iterations.
MAIN = (
    Arm("nft", "DiffusionNFT (G=16, K=1)", baseline=True),
    Arm("e2po", "E2PO (G=4, K=4)"),
)
ABLATIONS = (
    # Perturbation size: the preset's relative max-norm 0.2 leaves cos-to-anchor ≈ 0.92 (above μ = 0.8) and
    # moves images by ~0.005 RMS at a shared noise (docs/results.md); larger bounds test whether E2PO
    # helps once its perturbations change what is generated.
    Arm("norm-1.0", "E2PO max-norm 1.0 (relative)", overrides=("perturb.max_norm=1.0",)),
    Arm("norm-0.5", "E2PO max-norm 0.5 (relative)", overrides=("perturb.max_norm=0.5",)),
    Arm("gk-1x16", "E2PO G=1, K=16", overrides=("rollout.num_noises=1", "rollout.num_conditions=16")),
    Arm("gk-2x8", "E2PO G=2, K=8", overrides=("rollout.num_noises=2", "rollout.num_conditions=8")),
    Arm("gk-8x2", "E2PO G=8, K=2", overrides=("rollout.num_noises=8", "rollout.num_conditions=2")),
    Arm("static", "E2PO static perturbation (no ρ schedule)", overrides=("rollout.schedule=static",)),
    Arm("no-anchor", "E2PO without C_orig in the batch", overrides=("rollout.include_original=false",)),
    Arm("lambda-0", "E2PO λ_div = 0", overrides=("perturb.lambda_div=0",)),
    Arm("lambda-100", "E2PO λ_div = 100", overrides=("perturb.lambda_div=100",)),
)
ARMS = {arm.name: arm for arm in MAIN + ABLATIONS}


def run_dir(out: Path, arm: Arm, seed: int) -> Path:
    return out / arm.name / f"seed-{seed}"


def train_command(arm: Arm, seed: int, iterations: int, directory: Path, endpoint: str) -> list[str]:
    reward = f"geneval={endpoint},output=geneval/score"
    if (directory / "checkpoints" / "latest").exists():
        return [
            sys.executable,
            "-m",
            "trainer.run",
            "--resume",
            str(directory),
            "--iterations",
            str(iterations),
            "--reward-endpoint",
            reward,
        ]
    cmd = [
        sys.executable,
        "-m",
        "trainer.run",
        "--preset",
        "shapes",
        "--iterations",
        str(iterations),
        "--out",
        str(directory),
        "--reward-endpoint",
        reward,
        "--set",
        f"run.seed={seed}",
    ]
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


def reproduce(out: Path, plan: list[tuple[Arm, list[int]]], iterations: int, eval_samples: int) -> None:
    service = LocalService("geneval", ["--detector", "shapes"])
    endpoint = asyncio.run(service.start())
    try:
        for arm, seeds in plan:
            for seed in seeds:
                directory = run_dir(out, arm, seed)
                if (directory / "eval" / "results.json").exists():
                    print(f"[done] {arm.name} seed {seed}", flush=True)
                    continue
                print(f"[train] {arm.name} seed {seed} → {directory}", flush=True)
                children.run(train_command(arm, seed, iterations, directory, endpoint))
                children.run(eval_command(directory, endpoint, eval_samples), stdout=subprocess.DEVNULL)
    finally:
        service.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.experiments", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="train and evaluate every arm (resumable)")
    rep.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    rep.add_argument(
        "--seeds", type=int, default=3, help="seeds for the main comparison (ablations use seed 0)"
    )
    rep.add_argument(
        "--iterations", type=int, default=25, help="per run (25 × ~20 s: main study ≈ 1 h on 2 cores)"
    )
    rep.add_argument("--eval-samples", type=int, default=4, help="samples per held-out prompt")
    rep.add_argument("--only", choices=["main", "ablations", "all"], default="all")
    rep.add_argument("--arm", action="append", default=[], help="run only these arms (by name)")
    report = sub.add_parser("report", help="plots and tables from the run directories")
    report.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    report.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    report.add_argument("--img", type=Path, default=Path("docs/img"))
    args = p.parse_args(argv)
    if args.command == "reproduce":
        plan: list[tuple[Arm, list[int]]] = []
        if args.only in ("main", "all"):
            plan += [(arm, list(range(args.seeds))) for arm in MAIN]
        if args.only in ("ablations", "all"):
            plan += [(arm, [0]) for arm in ABLATIONS]
        if args.arm:
            plan = [(arm, seeds) for arm, seeds in plan if arm.name in args.arm]
        children.stop_on_sigterm()
        try:
            reproduce(args.out, plan, args.iterations, args.eval_samples)
        except KeyboardInterrupt:
            print(
                f"stopped; finished runs are kept, rerun the same command to continue ({args.out})",
                file=sys.stderr,
            )
            return children.STOPPED_EXIT_CODE
        return 0
    from trainer.results import write_report

    write_report(args.out, args.doc, args.img, main=MAIN, ablations=ABLATIONS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
