"""Train with E2PO: ``python -m trainer.run [--preset shapes] [--reward-endpoint NAME=HOST:PORT …]``.

With no arguments this is the CPU demo: the ``shapes`` preset, its GenEval service (exact shapes
detector) started locally, a short run. ``--resume RUN_DIR`` continues a run from its latest
checkpoint with the run's saved config; ``--iterations`` is the run's total, so it also extends it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import torch

from trainer import children
from trainer.checkpoint import CheckpointError
from trainer.config import PRESETS, TrainConfig, apply_override, build_config
from trainer.loop import Trainer
from trainer.model import load_model, pick_device
from trainer.rewards import RewardSet, RewardSpec, RewardUnavailable

log = logging.getLogger("trainer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="shapes", choices=sorted(PRESETS))
    p.add_argument(
        "--baseline", choices=["nft"], help="DiffusionNFT at equal samples per prompt (K = 1, G = G·K)"
    )
    p.add_argument("--iterations", type=int, help="total iterations of the run")
    p.add_argument("--model", help="hub id or local SD3 pipeline directory ('shapes' = shipped shapes model)")
    p.add_argument(
        "--reward-endpoint",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT[,weight=W][,output=O]",
        help="a running reward service (repeat for several; replaces the preset's rewards)",
    )
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", type=Path, help="run directory (or checkpoint) to continue")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field"
    )
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """The run's config (a preset, or the resumed run's saved one) with the command line applied."""
    if args.resume is not None:
        # --resume takes the run directory or one of its checkpoints (RUN/checkpoints/iter-N).
        run_dir = args.resume if (args.resume / "config.json").exists() else args.resume.parent.parent
        if not (run_dir / "config.json").is_file():
            raise ValueError(
                f"--resume {args.resume}: not a run directory or one of its checkpoints (no config.json)"
            )
        cfg = TrainConfig.load(run_dir / "config.json")
        for item in args.set:
            apply_override(cfg, item)
    else:
        cfg = build_config(args.preset, baseline=args.baseline or "e2po", overrides=args.set)
    if args.iterations is not None:
        cfg.run.iterations = args.iterations
    if args.model is not None:
        cfg.model.path = args.model
    if args.out is not None:
        cfg.run.out = args.out
    if args.reward_endpoint:
        cfg.reward.rewards = [RewardSpec.parse(e) for e in args.reward_endpoint]
    cfg.validate()
    return cfg, run_dir if args.resume is not None else Path(cfg.run.out)


async def train(cfg: TrainConfig, run_dir: Path, resume: Path | None) -> None:
    device = pick_device(cfg.run.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_model(cfg.model, device)
    rewards = RewardSet(cfg.reward)
    try:
        await rewards.connect()
        # Again, now that the services have filled in what the config left open (each reward's output),
        # so config.json is the config the run used.
        _save_config(cfg, run_dir)
        trainer = Trainer(cfg, model, rewards, run_dir, resume=resume)
        await trainer.train()
    finally:
        await rewards.close()


def _save_config(cfg: TrainConfig, run_dir: Path) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun/accelerate only rank 0 writes files
        cfg.save(run_dir / "config.json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, run_dir = resolve_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    _save_config(cfg, run_dir)  # before anything starts: a run stopped while connecting can resume
    torch.manual_seed(cfg.run.seed)
    children.stop_on_sigterm()
    try:
        asyncio.run(train(cfg, run_dir, args.resume))
    except (RewardUnavailable, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stopped; continue from the last checkpoint with --resume {run_dir}", file=sys.stderr)
        return children.STOPPED_EXIT_CODE
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # the summary, like the files, comes from rank 0 only
    print(f"run:     {run_dir}")
    print(f"metrics: {run_dir / 'metrics.jsonl'}")
    print(f"plots:   {run_dir / 'plots' / 'curves.png'}")
    lora = run_dir / "checkpoints" / "latest" / "lora"
    if lora.is_dir():
        print(f'LoRA:    {lora}  (pipe.load_lora_weights("{lora}"))')
    return 0


if __name__ == "__main__":
    sys.exit(main())
