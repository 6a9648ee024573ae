"""Evaluate a shapes model on the held-out GenEval-shapes prompts (the library is :mod:`shapes.heldout`).

    python -m shapes.evaluate [--model DIR] [--steps 40] [--out grid.png] [--seed S] [--record]

``--record`` stores the result in the model's manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from services.geneval.grid import tag_grid
from shapes.heldout import DEFAULT_MODEL, EvalConfig, evaluate_model, heldout_records, record_in_manifest
from shapes.model import load_shapes_model, read_manifest
from shapes.openmp import reexec_with_passive_openmp


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    reexec_with_passive_openmp("shapes.evaluate", argv)
    defaults = EvalConfig()
    parser = argparse.ArgumentParser(
        prog="python -m shapes.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="shapes pipeline directory")
    parser.add_argument("--steps", type=int, default=defaults.num_steps)
    parser.add_argument(
        "--shift", type=float, default=None, help="sample on this timestep shift (default: the prior's own)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--images-per-prompt", type=int, default=defaults.images_per_prompt)
    parser.add_argument("--min-images-per-tag", type=int, default=defaults.min_images_per_tag)
    parser.add_argument("--threads", type=int, default=defaults.num_threads)
    parser.add_argument("--out", type=Path, default=None, help="sample-grid PNG to write")
    parser.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--record", action="store_true", help="store the result in the model's manifest")
    args = parser.parse_args(argv)
    config = EvalConfig(
        num_steps=args.steps,
        shift=args.shift,
        seed=args.seed,
        images_per_prompt=args.images_per_prompt,
        min_images_per_tag=args.min_images_per_tag,
        num_threads=args.threads,
    )
    torch.set_num_threads(config.num_threads)
    manifest = read_manifest(args.model) or {}
    split_seed = manifest.get("pretrain", {}).get("split_seed", 0)
    try:
        model = load_shapes_model(args.model, shift=config.shift)
    except ValueError as exc:
        parser.error(str(exc))
    result, images, records, correct = evaluate_model(model, heldout_records(split_seed), config)
    print(result.table())
    print(
        f"({sum(result.num_images.values())} images, {config.num_steps} Euler steps at shift "
        f"{model.scheduler.config.shift:g}, seed {config.seed}, "
        f"{result.seconds:.0f} s)"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tag_grid(images, records, correct).save(args.out)
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    recorded = manifest.get("prior_eval")
    if recorded is not None:
        gap = result.overall - recorded["overall"]
        print(f"recorded overall {recorded['overall']:.3f}; this run differs by {gap:+.3f}")
    if args.record:
        record_in_manifest(args.model, result)


if __name__ == "__main__":
    main()
