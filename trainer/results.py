"""Turn the study's run directories into docs/results.md: curves with seed bands, eval and ablation tables."""

from __future__ import annotations

import json
import platform
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.geneval.metadata import TAGS as GENEVAL_TAGS

CURVES = (
    # Symmetric log: the ratio is often exactly 0, which a log axis cannot show; linear below 0.05, which
    # is below the smallest non-zero ratio of an 8-prompt iteration (1/8).
    (
        "zero_std_ratio",
        "zero-std ratio (fraction of prompt groups with identical rewards)",
        {"value": "symlog", "linthresh": 0.05},
    ),
    ("group_std_mean", "mean group reward std", {"value": "log"}),
    ("reward_mean", "training reward (GenEval-shapes partial credit)", {"value": "linear"}),
)


def load_runs(out: Path, arm: Any) -> list[dict[str, Any]]:
    """Every finished seed of an arm: metrics rows, eval summary, training seconds."""
    runs = []
    for directory in sorted((out / arm.name).glob("seed-*")):
        results = directory / "eval" / "results.json"
        metrics = directory / "metrics.jsonl"
        if not results.exists() or not metrics.exists():
            continue
        rewards = directory / "rewards.jsonl"
        metrics_rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        runs.append(
            {
                "seed": int(directory.name.removeprefix("seed-")),
                "metrics": metrics_rows,
                "eval": json.loads(results.read_text()),
                "train_seconds": train_seconds(metrics_rows),
                "equal_across_k": equal_across_conditions(rewards) if rewards.exists() else float("nan"),
            }
        )
    return runs


def train_seconds(metrics: Sequence[dict[str, Any]]) -> float:
    """Seconds spent in a run's training iterations, summed from its per-iteration log. Unlike a timer
    around the process it survives interruption: a resumed run's earlier iterations are still counted."""
    return float(sum(row["time/iteration"] for row in metrics))


def equal_across_conditions(rewards_jsonl: Path) -> float:
    """Fraction of (iteration, prompt, noise) cells whose K samples all got the same reward.

    The G×K grid shares each noise across the K conditions; when the perturbations do not change what is
    generated enough to change the reward, a cell contributes one reward K times and the group has fewer
    effective samples than G·K. Samples are numbered prompt-major, (prompt·G + noise)·K + condition, so a
    cell is sample // K (a prompt drawn twice in one iteration still gives two cells). NaN for K = 1."""
    rows = [json.loads(line) for line in rewards_jsonl.read_text().splitlines() if line.strip()]
    num_conditions = 1 + max((row["condition"] for row in rows), default=0)
    if num_conditions < 2:
        return float("nan")
    cells: dict[tuple[int, int], set[float]] = defaultdict(set)
    for row in rows:
        cells[row["iteration"], row["sample"] // num_conditions].add(row["reward"])
    return sum(len(rewards) == 1 for rewards in cells.values()) / len(cells)


def curve(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values (seeds, iterations)) truncated to the shortest run."""
    length = min(len(r["metrics"]) for r in runs)
    xs = np.array([row["iteration"] for row in runs[0]["metrics"][:length]])
    ys = np.array([[row.get(key, np.nan) for row in r["metrics"][:length]] for r in runs], dtype=float)
    return xs, ys


def plot_curves(groups: dict[str, tuple[str, list[dict[str, Any]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(5.2 * len(CURVES), 3.6))
    for ax, (key, title, yscale) in zip(axes, CURVES, strict=True):
        for label, runs in groups.values():
            xs, ys = curve(runs, key)
            mean = np.nanmean(ys, axis=0)
            (line,) = ax.plot(xs, mean, label=label)
            if len(runs) > 1:
                ax.fill_between(
                    xs, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), alpha=0.2, color=line.get_color()
                )
        ax.set_yscale(**yscale)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _tail(runs: list[dict[str, Any]], key: str, last: int = 5) -> list[float]:
    """Per run, the mean of ``key`` over its last ``last`` iterations (NaN where it was never logged)."""
    out = []
    for run in runs:
        values = [row[key] for row in run["metrics"][-last:] if key in row]
        out.append(float(np.mean(values)) if values else float("nan"))
    return out


def eval_table(groups: dict[str, tuple[str, list[dict[str, Any]]]]) -> str:
    header = (
        "| method | seeds | " + " | ".join(GENEVAL_TAGS) + " | overall | pixel diversity | layout diversity |"
    )
    lines = [header, "|" + " --- |" * (len(GENEVAL_TAGS) + 5)]
    for label, runs in groups.values():
        cells = [
            _mean_std([r["eval"].get("geneval/per_tag", {}).get(t, np.nan) for r in runs])
            for t in GENEVAL_TAGS
        ]
        cells.append(_mean_std([r["eval"].get("geneval/overall", np.nan) for r in runs]))
        cells.append(_mean_std([r["eval"].get("diversity/pixel_rms", np.nan) for r in runs]))
        cells.append(_mean_std([r["eval"].get("diversity/layout", np.nan) for r in runs]))
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_table(groups: dict[str, tuple[str, list[dict[str, Any]]]]) -> str:
    lines = [
        "| method | reward (first 5 it.) | reward (last 5 it.) | zero-std (first 5) | zero-std (last 5) | "
        "group std (last 5) | cos to anchor | same reward across K | held-out GenEval | train time / run |",
        "|" + " --- |" * 10,
    ]
    for label, runs in groups.values():
        first = [float(np.mean([row["reward_mean"] for row in r["metrics"][:5]])) for r in runs]
        first_zero = [float(np.mean([row["zero_std_ratio"] for row in r["metrics"][:5]])) for r in runs]
        lines.append(
            f"| {label} | {_mean_std(first)} | {_mean_std(_tail(runs, 'reward_mean'))} | "
            f"{_mean_std(first_zero)} | "
            f"{_mean_std(_tail(runs, 'zero_std_ratio'))} | {_mean_std(_tail(runs, 'group_std_mean'))} | "
            f"{_mean_std(_tail(runs, 'perturb/cos_anchor_mean', last=len(runs[0]['metrics'])))} | "
            f"{_mean_std([r['equal_across_k'] for r in runs])} | "
            f"{_mean_std([r['eval'].get('geneval/overall', np.nan) for r in runs])} | "
            f"{np.mean([r['train_seconds'] for r in runs]) / 60:.1f} min |"
        )
    return "\n".join(lines)


def write_report(out: Path, doc: Path, img: Path, *, main: Sequence[Any], ablations: Sequence[Any]) -> None:
    # Each run's logs are read once (rewards.jsonl is ~1 MB a run).
    loaded = {arm.name: load_runs(out, arm) for arm in (*main, *ablations)}
    main_groups = {arm.name: (arm.label, runs) for arm in main if (runs := loaded[arm.name])}
    if not main_groups:
        raise SystemExit(f"no finished runs under {out}")
    plot_curves(main_groups, img / "results_curves.png")
    seed0 = {
        name: (label, [r for r in runs if r["seed"] == 0]) for name, (label, runs) in main_groups.items()
    }
    ablation_groups = {k: v for k, v in seed0.items() if v[1]}
    ablation_groups.update({arm.name: (arm.label, runs) for arm in ablations if (runs := loaded[arm.name])})
    iterations = len(next(iter(main_groups.values()))[1][0]["metrics"])
    config = json.loads((out / main[0].name / "seed-0" / "config.json").read_text())
    total_train = sum(r["train_seconds"] for runs in loaded.values() for r in runs)
    sections = [
        "<!-- generated by `python -m trainer.experiments report`; the text above the marker is kept -->",
        "## Setup (generated)",
        f"- Machine: {platform.machine()}, {_cpu_count()} CPU cores, no GPU; {total_train / 60:.0f} min of "
        "training iterations over all runs (the iteration times in each run's metrics.jsonl, so a resumed "
        "run counts all its parts; loading and the held-out evaluation add about a minute per run).",
        f"- Every arm: {iterations} iterations × {config['data']['num_prompts']} prompts × "
        "16 samples per prompt "
        f"(G·K = 16), {config['rollout']['num_steps']}-step {config['rollout']['sampler']} rollouts, "
        f"LoRA r {config['model']['lora_rank']}, lr {config['optim']['lr']}, "
        f"NFT β {config['nft']['nft_beta']}, "
        f"perturbation max-norm {config['perturb']['max_norm']} ({config['perturb']['max_norm_mode']}), "
        f"T_emb {config['perturb']['num_steps']}, λ_div {config['perturb']['lambda_div']}.",
        "- Reward: GenEval partial credit from the GenEval service with the exact shapes detector.",
        "- Held-out evaluation: EMA weights, 40-step ODE, GenEval correctness per tag; diversity over the "
        "samples of each held-out prompt: mean pairwise RMS pixel distance, and layout diversity "
        "(1 − Hungarian-matched box IoU between samples, boxes from the exact detector).",
        "",
        "## Training dynamics (generated)",
        "![curves](img/results_curves.png)",
        "",
        training_table(main_groups),
        "",
        "## Held-out GenEval-shapes (generated)",
        eval_table(main_groups),
        "",
        "## Ablations, seed 0 (generated)",
        training_table(ablation_groups),
        "",
        eval_table(ablation_groups),
        "",
    ]
    marker = "<!-- generated by"
    kept = doc.read_text().split(marker)[0].rstrip() + "\n\n" if doc.exists() else "# Results\n\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(kept + "\n".join(sections))


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0
