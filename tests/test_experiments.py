"""The studies' arms are what their labels say, runs are planned seed-major, and the report is built from
the committed results folder alone."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import experiments
from trainer import run as trainer_run
from trainer.results import CURVES, curves_figure, load_runs, write_report
from trainer.studies import STUDIES, TABLE1, TABLE1_NORM, Study


def resolved(study: Study, arm_name: str, seed: int, tmp_path: Path):
    """The config ``python -m trainer.run`` resolves for an arm's command (up to the flags)."""
    command = experiments.train_command(study, study.arm(arm_name), seed, tmp_path / "run", "127.0.0.1:1")
    assert command[1:3] == ["-m", "trainer.run"]
    cfg, _ = trainer_run.resolve_config(trainer_run.parse_args(command[3:]))
    return cfg


@pytest.mark.parametrize(
    ("arm", "noises", "conditions"),
    [("nft-g4", 4, 1), ("nft-g16", 16, 1), ("e2po-g4k4", 4, 4), ("e2po-g4k2", 4, 2), ("e2po-g4k8", 4, 8)],
)
def test_table1_arms_have_the_labelled_noises_and_conditions(arm, noises, conditions, tmp_path: Path):
    cfg = resolved(TABLE1, arm, 3, tmp_path)
    assert (cfg.rollout.num_noises, cfg.rollout.num_conditions) == (noises, conditions)
    assert cfg.run.seed == 3 and cfg.run.iterations == TABLE1.iterations
    assert len(cfg.data.train_prompts) == cfg.data.num_prompts == 7 and cfg.model.scheduler_shift == 3.0
    assert all(p.endswith(" circle") for p in cfg.data.train_prompts)
    # The paper's perturbation (Table 3) in the shapes encoder's units: 0.05 / 0.4 of a token's norm.
    assert (cfg.perturb.num_steps, cfg.perturb.max_norm, cfg.perturb.max_norm_mode) == (
        300,
        0.125,
        "relative",
    )


def test_every_seed_of_an_arm_sees_the_same_prompts_as_the_other_arms(tmp_path: Path):
    seeds = {arm.name: resolved(TABLE1, arm.name, 5, tmp_path).run.seed for arm in TABLE1.arms}
    assert set(seeds.values()) == {5}


def test_plan_is_seed_major_main_arms_first():
    plan = TABLE1.plan(seeds=2, extra_seeds=1)
    assert [(a.name, s) for a, s in plan] == [
        ("nft-g4", 0), ("nft-g16", 0), ("e2po-g4k4", 0),
        ("nft-g4", 1), ("nft-g16", 1), ("e2po-g4k4", 1),
        ("e2po-g4k2", 0), ("e2po-g4k8", 0),
    ]  # fmt: skip


def test_arm_names_are_unique_within_each_study():
    for study in STUDIES.values():
        names = [a.name for a in study.every_arm]
        assert len(names) == len(set(names))
        known = set(names)
        if study.pairs_with is not None:
            paired = STUDIES[study.pairs_with]
            assert (paired.preset, paired.iterations) == (study.preset, study.iterations)
            known |= {a.name for a in paired.every_arm}
        assert {n for pair in study.comparisons for n in pair} <= known


def write_run(folder: Path, seed: int, overall: float, zero_std: list[float], ties: float | None) -> None:
    folder.mkdir(parents=True)
    config = {
        "data": {"num_prompts": 8, "train_tags": ["single_object", "colors"]},
        "rollout": {"num_steps": 10, "sampler": "euler"},
        "model": {"lora_rank": 8, "scheduler_shift": None},
        "run": {"iterations": len(zero_std)},
        "optim": {"lr": 1e-3},
        "nft": {"nft_beta": 1.0},
        "perturb": {"max_norm": 0.125, "max_norm_mode": "relative", "num_steps": 300, "anchor_mu": 0.8,
                    "lambda_div": 50.0},
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    rows = [
        {"iteration": i + 1, "zero_std_ratio": z, "reward_mean": 0.5 + 0.01 * i, "group_std_mean": 0.2,
         "time/iteration": 10.0}
        for i, z in enumerate(zero_std)
    ]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    per_iteration = {} if ties is None else {str(i + 1): ties for i in range(len(zero_std))}
    (folder / "ties.json").write_text(
        json.dumps({"equal_across_k": float("nan") if ties is None else ties, "per_iteration": per_iteration})
    )
    tags = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    (folder / "eval.json").write_text(
        json.dumps({"geneval/overall": overall, "geneval/per_tag": dict.fromkeys(tags, overall)})
    )


def test_report_is_built_from_the_results_folder_alone(tmp_path: Path):
    results = tmp_path / "results"
    (results / "table1").mkdir(parents=True)
    (results / "table1" / "study.json").write_text(json.dumps({"commit": "0123456789abcdef", "dirty": False}))
    for seed in range(3):
        write_run(results / "table1" / "nft-g4" / f"seed-{seed}", seed, 0.20 + 0.01 * seed, [0.5] * 6, None)
        write_run(results / "table1" / "nft-g16" / f"seed-{seed}", seed, 0.22, [0.0] * 6, None)
        write_run(results / "table1" / "e2po-g4k4" / f"seed-{seed}", seed, 0.25 + 0.01 * seed, [0.1] * 6, 0.5)
    (results / "table1" / "e2po-g4k4" / "seed-9").mkdir()  # unfinished: no eval.json, not counted
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nhand-written reading\n\n<!-- generated by old -->\nold tables\n")
    write_report(TABLE1, results, doc, tmp_path / "img" / "archived")
    text = doc.read_text()
    assert text.startswith("# Results\n\nhand-written reading\n") and "old tables" not in text
    assert (
        "commit `0123456789`" in text
        and (tmp_path / "img" / "archived" / "results_table1_curves.png").is_file()
    )
    assert "![curves](img/archived/results_table1_curves.png)" in text  # linked from the page's folder
    assert f"## Setup (generated from {(results / 'table1').as_posix()}/)" in text
    # E2PO − NFT G=4 is +0.05 on every seed: the interval collapses onto it.
    assert (
        "| held-out GenEval overall | +0.050 [+0.050, +0.050] (n=3) | +0.040 [+0.030, +0.050] (n=3) |" in text
    )
    assert "| DiffusionNFT (G=4, K=1): same noises | 3 |" in text
    assert "3 of 3 | 1 (median)" in text  # nft-g4: zero-std 0.5 ≥ 0.3 from its first iteration on


def test_a_paired_study_is_compared_with_the_collected_runs_of_the_study_it_pairs_with(tmp_path: Path):
    results = tmp_path / "results"
    for name, commit in (("table1", "aaaaaaaaaaaa"), ("table1-norm", "bbbbbbbbbbbb")):
        (results / name).mkdir(parents=True)
        (results / name / "study.json").write_text(json.dumps({"commit": commit, "dirty": False}))
    for seed in range(4):
        write_run(results / "table1" / "nft-g4" / f"seed-{seed}", seed, 0.20, [0.5] * 6, None)
        write_run(results / "table1" / "e2po-g4k4" / f"seed-{seed}", seed, 0.21 + 0.01 * seed, [0.4] * 6, 0.9)
        write_run(results / "table1" / "nft-g16" / f"seed-{seed}", seed, 0.90, [0.0] * 6, None)
    for seed in (1, 2, 5):  # seed 5 has no partner: it counts for the arm's own row, not for a difference
        write_run(results / "table1-norm" / "e2po-g4k4-norm0.5" / f"seed-{seed}", seed, 0.26, [0.1] * 6, 0.6)
    doc = tmp_path / "results-table1-norm.md"
    write_report(TABLE1_NORM, results, doc, tmp_path / "img", paired=TABLE1)
    text = doc.read_text()
    assert "commit `bbbbbbbbbb`" in text
    assert f"study `table1` ({(results / 'table1').as_posix()}/, commit `aaaaaaaaaa`)" in text
    # seeds 1 and 2: 0.26 − 0.20 = +0.06 against nft-g4; 0.26 − 0.22 and 0.26 − 0.23 against e2po-g4k4
    overall = "| held-out GenEval overall | +0.060 [+0.060, +0.060] (n=2) | +0.035 [+0.030, +0.040] (n=2) |"
    assert overall in text
    assert "| E2PO (G=4, K=4), max-norm 0.5 (relative) | 3 |" in text
    assert "| DiffusionNFT (G=4, K=1): same noises | 4 |" in text
    assert "G=16" not in text  # not named by a comparison: not shown
    with pytest.raises(ValueError, match="pairs with 'table1'"):
        write_report(TABLE1_NORM, results, doc, tmp_path / "img")


def test_an_arm_keeps_its_colour_in_panels_where_the_arms_before_it_have_no_curve(tmp_path: Path):
    for arm, ties in (("nft-g4", None), ("e2po-g4k4", 0.9)):
        write_run(tmp_path / arm / "seed-0", 0, 0.2, [0.1] * 4, ties)
    groups = {arm.name: (arm.label, load_runs(tmp_path.parent, tmp_path.name, arm)) for arm in TABLE1.arms}
    groups = {name: group for name, group in groups.items() if group[1]}
    fig = curves_figure(groups)
    zero_std, ties = fig.axes[0], fig.axes[[key for key, _ in CURVES].index("ties")]
    labelled = [line for line in zero_std.get_lines() if "(n=" in line.get_label()]
    colour = {line.get_label(): line.get_color() for line in labelled}
    assert len(colour) == 2 and len(set(colour.values())) == 2
    (e2po_ties,) = ties.get_lines()
    assert e2po_ties.get_label().startswith("E2PO") and e2po_ties.get_color() == colour[e2po_ties.get_label()]


class FakeService:
    """Stands in for the study's local GenEval service: the commands below never call it."""

    def __init__(self, *args) -> None:
        pass

    async def start(self) -> str:
        return "127.0.0.1:1"

    def stop(self) -> None:
        pass


LOG_AND_SLEEP = (
    "import sys, time; log = open(sys.argv[1], 'a'); t = time.time; "
    "log.write(f'{t()} start {sys.argv[2]}\\n'); log.flush(); time.sleep(float(sys.argv[3])); "
    "log.write(f'{t()} end {sys.argv[2]}\\n'); sys.exit(int(sys.argv[4]))"
)


def fake_command(log: Path, key: str, seconds: float, code: int = 0) -> list[str]:
    """A command that logs its start and end (wall clock) around a sleep, then exits with ``code``."""
    return [sys.executable, "-c", LOG_AND_SLEEP, str(log), key, str(seconds), str(code)]


def test_reproduce_runs_jobs_at_once_each_evaluated_after_its_training(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "log"
    collected = []
    monkeypatch.setattr(experiments, "LocalService", FakeService)
    monkeypatch.setattr(
        experiments,
        "train_command",
        lambda st, arm, seed, *_: fake_command(log, f"train {arm.name} {seed}", 0.4),
    )
    monkeypatch.setattr(
        experiments,
        "eval_command",
        lambda run, *_: fake_command(log, f"eval {run.parent.name} {run.name.removeprefix('seed-')}", 0.2),
    )
    monkeypatch.setattr(experiments, "collect", lambda directory, destination: collected.append(destination))
    monkeypatch.setattr(experiments, "code_commit", lambda: {"commit": "0" * 40, "dirty": False})
    plan = TABLE1.plan(seeds=2, extra_seeds=0)
    experiments.reproduce(TABLE1, plan, tmp_path / "out", tmp_path / "results", jobs=2)

    events = [line.split(maxsplit=2) for line in log.read_text().splitlines()]
    events.sort(key=lambda e: float(e[0]))
    at_once, most = 0, 0
    for _, kind, _ in events:
        at_once += 1 if kind == "start" else -1
        most = max(most, at_once)
    assert most == 2  # two runs overlapped, never three
    names = [name for _, kind, name in events if kind == "start"]
    for arm, seed in plan:
        assert names.index(f"eval {arm.name} {seed}") > names.index(f"train {arm.name} {seed}")
    assert sorted(collected) == sorted(
        experiments.run_dir(tmp_path / "results", TABLE1, a, s) for a, s in plan
    )


def test_a_failed_run_stops_the_runs_beside_it(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "log"
    monkeypatch.setattr(experiments, "LocalService", FakeService)

    def train(study, arm, seed, *_) -> list[str]:
        failing = arm.name == "nft-g16"
        return fake_command(log, f"train {arm.name}", 0.1 if failing else 30, code=3 if failing else 0)

    monkeypatch.setattr(experiments, "train_command", train)
    monkeypatch.setattr(experiments, "code_commit", lambda: {"commit": "0" * 40, "dirty": False})
    started = time.monotonic()
    with pytest.raises(subprocess.CalledProcessError):
        experiments.reproduce(TABLE1, TABLE1.plan(1, 0), tmp_path / "out", tmp_path / "results", jobs=2)
    assert time.monotonic() - started < 10  # the 30 s run beside it was stopped, not waited for
    assert "end train nft-g4" not in log.read_text()
