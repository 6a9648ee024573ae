"""Turn a study's committed results into docs/results.md: curves with seed bands, per-tag tables, paired
differences with bootstrap intervals, and the mechanism (ties across K, onset of collapse)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from services.geneval.metadata import TAGS as GENEVAL_TAGS

if TYPE_CHECKING:
    from trainer.studies import Arm, Study

COLLAPSE_THRESHOLD = 0.3
"""Zero-std ratio at which a run counts as collapsed (the paper's Fig. 2 situation)."""
BOOTSTRAP_RESAMPLES = 10_000

CURVES = (
    ("zero_std_ratio", "zero-std ratio (prompt groups with identical rewards)"),
    ("reward_mean", "training reward (GenEval-shapes partial credit)"),
    ("group_std_mean", "mean group reward std"),
    ("ties", "same reward across K (share of (prompt, noise) cells)"),
)

Run = dict[str, Any]


# -- reading the logs ---------------------------------------------------------------------------------


def _read_rewards(rewards_jsonl: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in rewards_jsonl.read_text().splitlines() if line.strip()]


def _tied_cells(rows: list[dict[str, Any]]) -> dict[tuple[int, int], bool] | None:
    """(iteration, cell) → whether the cell's K samples all got the same reward; None for K = 1.

    The G×K grid shares each noise across the K conditions; when the perturbations do not change what is
    generated enough to change the reward, a cell contributes one reward K times and the group has fewer
    effective samples than G·K. Samples are numbered prompt-major, (prompt·G + noise)·K + condition, so a
    cell is sample // K (a prompt drawn twice in one iteration still gives two cells)."""
    num_conditions = 1 + max((row["condition"] for row in rows), default=0)
    if num_conditions < 2:
        return None
    cells: dict[tuple[int, int], set[float]] = defaultdict(set)
    for row in rows:
        cells[row["iteration"], row["sample"] // num_conditions].add(row["reward"])
    return {key: len(rewards) == 1 for key, rewards in cells.items()}


def ties_across_conditions(rewards_jsonl: Path) -> dict[str, Any]:
    """From one read of a run's reward log: ``equal_across_k``, the fraction of (iteration, prompt, noise)
    cells whose K samples all got the same reward (NaN for K = 1), and ``per_iteration``, the same share
    per iteration (keys are iteration numbers as text, for JSON; {} for K = 1)."""
    tied = _tied_cells(_read_rewards(rewards_jsonl))
    if tied is None:
        return {"equal_across_k": float("nan"), "per_iteration": {}}
    per: dict[int, list[bool]] = defaultdict(list)
    for (iteration, _), value in tied.items():
        per[iteration].append(value)
    return {
        "equal_across_k": sum(tied.values()) / len(tied),
        "per_iteration": {str(i): sum(v) / len(v) for i, v in sorted(per.items())},
    }


def train_seconds(metrics: Sequence[dict[str, Any]]) -> float:
    """Seconds spent in a run's training iterations, summed from its per-iteration log. Unlike a timer
    around the process it survives interruption: a resumed run's earlier iterations are still counted."""
    return float(sum(row["time/iteration"] for row in metrics))


def load_runs(results: Path, study_name: str, arm: Arm) -> list[Run]:
    """Every collected seed of an arm (a folder with eval.json is complete), in seed order."""
    runs = []
    for directory in (results / study_name / arm.name).glob("seed-*"):
        if not (directory / "eval.json").exists():
            continue
        metrics = [
            json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line
        ]
        ties = json.loads((directory / "ties.json").read_text())
        for row in metrics:
            row["ties"] = ties["per_iteration"].get(str(row["iteration"]), np.nan)
        runs.append(
            {
                "seed": int(directory.name.removeprefix("seed-")),
                "metrics": metrics,
                "eval": json.loads((directory / "eval.json").read_text()),
                "config": json.loads((directory / "config.json").read_text()),
                "ties": ties["equal_across_k"],
                "train_seconds": train_seconds(metrics),
            }
        )
    return sorted(runs, key=lambda r: r["seed"])


# -- statistics -----------------------------------------------------------------------------------------


def bootstrap_interval(
    values: Sequence[float], *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile bootstrap interval (resampling the values).

    For paired differences the values are the per-seed differences, so the interval is that of the mean
    paired difference. Seeded: the same values always give the same interval."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(data.mean()), float(low), float(high)


def tail_mean(run: Run, key: str, last: int = 5) -> float:
    """The mean of ``key`` over a run's last ``last`` iterations (NaN where it was never logged)."""
    values = [row[key] for row in run["metrics"][-last:] if key in row and row[key] == row[key]]
    return float(np.mean(values)) if values else float("nan")


def collapse_onset(run: Run, threshold: float = COLLAPSE_THRESHOLD) -> int | None:
    """First iteration whose zero-std ratio, averaged with its two neighbours, reaches ``threshold``."""
    ratios = np.array([row["zero_std_ratio"] for row in run["metrics"]], dtype=float)
    if ratios.size == 0:
        return None
    smooth = np.convolve(np.pad(ratios, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    hits = np.flatnonzero(smooth >= threshold)
    return int(run["metrics"][hits[0]]["iteration"]) if hits.size else None


def held_out(run: Run, tag: str | None = None) -> float:
    if tag is None:
        return float(run["eval"].get("geneval/overall", np.nan))
    return float(run["eval"].get("geneval/per_tag", {}).get(tag, np.nan))


def onset(run: Run) -> float:
    """The run's collapse onset as a number for paired differences; NaN when it never collapsed, so a
    difference exists only for the seeds where both arms collapse."""
    iteration = collapse_onset(run)
    return float("nan") if iteration is None else float(iteration)


Measure = tuple[str, Callable[[Run], float], int]
"""(row name, the per-run value, decimals shown)."""

MEASURES: tuple[Measure, ...] = (
    ("held-out GenEval overall", held_out, 3),
    *((f"held-out {tag}", lambda run, tag=tag: held_out(run, tag), 3) for tag in GENEVAL_TAGS),
    ("training reward (last 5 it.)", lambda run: tail_mean(run, "reward_mean"), 3),
    ("zero-std ratio (last 5 it.)", lambda run: tail_mean(run, "zero_std_ratio"), 3),
    ("collapse onset iteration (seeds where both collapse)", onset, 1),
    ("pixel diversity", lambda run: float(run["eval"].get("diversity/pixel_rms", np.nan)), 3),
    ("layout diversity", lambda run: float(run["eval"].get("diversity/layout", np.nan)), 3),
)


def paired_differences(runs: list[Run], against: list[Run], measure: Callable[[Run], float]) -> list[float]:
    """measure(run) − measure(run of ``against`` with the same seed), over the seeds both have."""
    by_seed = {r["seed"]: r for r in against}
    return [measure(r) - measure(by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]


# -- tables and plots -----------------------------------------------------------------------------------


def _mean_sd(values: Sequence[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def eval_table(groups: dict[str, tuple[str, list[Run]]]) -> str:
    header = (
        "| method | seeds | " + " | ".join(GENEVAL_TAGS) + " | overall | pixel diversity | layout diversity |"
    )
    lines = [header, "|" + " --- |" * (len(GENEVAL_TAGS) + 5)]
    for label, runs in groups.values():
        cells = [_mean_sd([held_out(r, t) for r in runs]) for t in GENEVAL_TAGS]
        cells.append(_mean_sd([held_out(r) for r in runs]))
        cells += [
            _mean_sd([float(r["eval"].get(k, np.nan)) for r in runs])
            for k in ("diversity/pixel_rms", "diversity/layout")
        ]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_table(groups: dict[str, tuple[str, list[Run]]]) -> str:
    lines = [
        "| method | reward (first 5 it.) | reward (last 5 it.) | zero-std (first 5) | zero-std (last 5) "
        f"| collapsed (zero-std ≥ {COLLAPSE_THRESHOLD}) | onset iteration | group std (last 5) "
        "| cos to anchor | same reward across K | train time / run |",
        "|" + " --- |" * 11,
    ]
    for label, runs in groups.values():
        first = [float(np.mean([row["reward_mean"] for row in r["metrics"][:5]])) for r in runs]
        first_zero = [float(np.mean([row["zero_std_ratio"] for row in r["metrics"][:5]])) for r in runs]
        onsets = [collapse_onset(r) for r in runs]
        hit = [o for o in onsets if o is not None]
        lines.append(
            f"| {label} | {_mean_sd(first)} | {_mean_sd([tail_mean(r, 'reward_mean') for r in runs])} | "
            f"{_mean_sd(first_zero)} | {_mean_sd([tail_mean(r, 'zero_std_ratio') for r in runs])} | "
            f"{len(hit)} of {len(runs)} | {f'{np.median(hit):.0f} (median)' if hit else '–'} | "
            f"{_mean_sd([tail_mean(r, 'group_std_mean') for r in runs])} | "
            f"{_mean_sd([tail_mean(r, 'perturb/cos_anchor_mean', last=len(r['metrics'])) for r in runs])} | "
            f"{_mean_sd([r['ties'] for r in runs])} | "
            f"{np.mean([r['train_seconds'] for r in runs]) / 60:.1f} min |"
        )
    return "\n".join(lines)


def differences_table(study: Study, loaded: dict[str, list[Run]]) -> str:
    lines = ["| measure | " + " | ".join(f"{a} − {b}" for a, b in study.comparisons) + " |"]
    lines.append("|" + " --- |" * (len(study.comparisons) + 1))
    for name, measure, digits in MEASURES:
        cells = []
        for arm, against in study.comparisons:
            # n counts the seeds with a difference (both arms measured: for the onset, both collapsed).
            diffs = [d for d in paired_differences(loaded[arm], loaded[against], measure) if d == d]
            mean, low, high = bootstrap_interval(diffs)
            f = f"+.{digits}f"
            cells.append("–" if not diffs else f"{mean:{f}} [{low:{f}}, {high:{f}}] (n={len(diffs)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves_figure(groups: dict[str, tuple[str, list[Run]]]):
    """One panel per curve, mean ± sd over seeds; an arm keeps its colour in every panel, also in those
    where arms before it have no such curve (DiffusionNFT has no ties across K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.6 * len(CURVES), 3.6))
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for index, (label, runs) in enumerate(groups.values()):
            length = min(len(r["metrics"]) for r in runs)
            xs = np.array([row["iteration"] for row in runs[0]["metrics"][:length]])
            ys = np.array(
                [[row.get(key, np.nan) for row in r["metrics"][:length]] for r in runs], dtype=float
            )
            if np.all(np.isnan(ys)):
                continue
            colour = colours[index % len(colours)]
            mean, sd = np.nanmean(ys, axis=0), np.nanstd(ys, axis=0)
            ax.plot(xs, mean, label=f"{label} (n={len(runs)})", color=colour)
            if len(runs) > 1:
                ax.fill_between(xs, mean - sd, mean + sd, alpha=0.2, color=colour)
        if key == "zero_std_ratio":
            ax.axhline(COLLAPSE_THRESHOLD, color="grey", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(groups: dict[str, tuple[str, list[Run]]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = curves_figure(groups)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_set(data: dict[str, Any]) -> str:
    """What a run trained on, in words: its named prompts, else its tags."""
    prompts = data.get("train_prompts") or []
    if prompts:
        return f"training prompts {', '.join(repr(p) for p in prompts)}"
    return f"training tags {', '.join(data.get('train_tags') or ['all'])}"


def shown_arms(study: Study, paired: Study | None = None) -> list[tuple[str, Arm]]:
    """(study name, arm) of every arm a report shows: the study's own, then those of the study it pairs
    with (``Study.pairs_with``) that its comparisons name."""
    own = [(study.name, arm) for arm in study.every_arm]
    if paired is None:
        return own
    named = {name for pair in study.comparisons for name in pair}
    return own + [(paired.name, arm) for arm in paired.every_arm if arm.name in named]


def paired_line(study: Study, paired: Study, names: list[str], results: Path) -> str:
    """The setup line naming the paired study's arms (``names``) shown beside the study's own."""
    frozen = json.loads((results / paired.name / "study.json").read_text())
    own = "; ".join(f"{arm.name}: {', '.join(arm.overrides) or 'the preset'}" for arm in study.arms)
    where = (results / paired.name).as_posix()
    return (
        f"- Compared with {', '.join(names)} of study `{paired.name}` ({where}/, commit "
        f"`{frozen['commit'][:10]}`{' with uncommitted changes' if frozen['dirty'] else ''}), paired by "
        f"seed; this study's arms differ from the preset in: {own}."
    )


def write_report(study: Study, results: Path, doc: Path, img: Path, paired: Study | None = None) -> None:
    """Regenerate ``doc`` below its marker, and the curves plot, from ``results`` alone. ``paired`` is the
    study named by ``study.pairs_with``, whose collected runs the comparisons may use."""
    given = paired.name if paired else None
    if given != study.pairs_with:
        raise ValueError(f"study {study.name} pairs with {study.pairs_with!r}, got {given!r}")
    arms = shown_arms(study, paired)
    loaded = {arm.name: load_runs(results, name, arm) for name, arm in arms}
    groups = {arm.name: (arm.label, runs) for _, arm in arms if (runs := loaded[arm.name])}
    own = [r for arm in study.every_arm for r in loaded[arm.name]]
    if not own:
        raise SystemExit(f"no collected runs under {results / study.name}")
    frozen = json.loads((results / study.name / "study.json").read_text())
    plot = img / f"results_{study.name}_curves.png"
    plot_curves(groups, plot)
    config = next(iter(groups.values()))[1][0]["config"]
    total_train = sum(r["train_seconds"] for r in own)
    pairing = []
    if paired is not None:
        pairing.append(paired_line(study, paired, [a.name for n, a in arms if n == paired.name], results))
    perturb, model = config["perturb"], config["model"]
    dirty = " (with uncommitted changes)" if frozen["dirty"] else ""
    sections = [
        f"<!-- generated by `python -m trainer.experiments report --study {study.name}`; the text above the "
        "marker is kept -->",
        f"## Setup (generated from {(results / study.name).as_posix()}/)",
        f"- Code: commit `{frozen['commit'][:10]}`{dirty}, "
        f"preset `{study.preset}`, {config['run']['iterations']} iterations × "
        f"{config['data']['num_prompts']} prompts, "
        f"{training_set(config['data'])}; "
        f"{config['rollout']['num_steps']}-step {config['rollout']['sampler']} rollouts, "
        f"LoRA r {model['lora_rank']}, lr {config['optim']['lr']} × "
        f"{config['optim'].get('optimizer_steps_per_iteration', 1)} steps an iteration, "
        f"NFT β {config['nft']['nft_beta']}; "
        f"σ-grid shift {model.get('scheduler_shift') or 'of the prior'}; perturbation max-norm "
        f"{perturb['max_norm']} ({perturb['max_norm_mode']}), T_emb {perturb['num_steps']}, "
        f"μ {perturb['anchor_mu']}, λ_div {perturb['lambda_div']}.",
        *pairing,
        f"- Machine: {frozen.get('machine', '?')}, {frozen.get('cpus', '?')} CPU cores, no GPU; "
        f"{total_train / 3600:.1f} h of "
        "training iterations over the study's runs (each run's metrics.jsonl; loading and the held-out "
        "evaluation, several minutes a run on 2 cores, are not counted).",
        "- Held-out evaluation: EMA weights, 40-step ODE, GenEval-shapes correctness per tag on every test "
        "prompt; diversity over each prompt's samples (pixel RMS distance; layout: 1 − matched box IoU).",
        "- Intervals: 95 % percentile bootstrap of the mean paired (same-seed) difference, "
        f"{BOOTSTRAP_RESAMPLES:,} resamples.",
        "",
        "## Training dynamics (generated)",
        f"![curves]({Path(os.path.relpath(plot, doc.parent)).as_posix()})",
        "",
        "Bands: ± one standard deviation over seeds.",
        "",
        training_table(groups),
        "",
        "## Held-out GenEval-shapes (generated)",
        "Mean ± standard deviation over seeds.",
        "",
        eval_table(groups),
        "",
        "## Paired differences (generated)",
        differences_table(study, loaded),
        "",
    ]
    marker = "<!-- generated by"
    kept = doc.read_text().split(marker)[0].rstrip() + "\n\n" if doc.exists() else "# Results\n\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(kept + "\n".join(sections))
