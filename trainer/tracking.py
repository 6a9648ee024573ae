"""Run logging: one JSON object per iteration in metrics.jsonl, TensorBoard scalars, PNG plots.

On resume, lines of iterations after the checkpoint are dropped first, so metrics.jsonl always reads
as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PLOTTED = (
    ("reward_mean", "reward mean", False),
    ("zero_std_ratio", "zero-std ratio", False),
    ("group_std_mean", "mean group reward std", True),
)


class RunLog:
    def __init__(
        self, run_dir: Path, *, resume_iteration: int | None = None, tensorboard: bool = True
    ) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "rewards.jsonl"
        # A resumed run drops what it will redo; a run starting from iteration 0 in a directory where an
        # earlier attempt was stopped before its first checkpoint drops that attempt's rows.
        for path in (self.metrics_path, self.samples_path):
            _truncate_after(path, resume_iteration or 0)
        self.history = _read(self.metrics_path)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, iteration: int, metrics: dict[str, Any]) -> None:
        record = {"iteration": iteration, **metrics}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.history.append(record)
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, iteration)
            self._tb.flush()

    def log_samples(self, iteration: int, rows: list[dict[str, Any]]) -> None:
        """Per-sample rewards: one line per scored sample (no sample lost or scored twice)."""
        with self.samples_path.open("a") as f:
            for row in rows:
                f.write(json.dumps({"iteration": iteration, **row}) + "\n")

    def plot(self) -> Path | None:
        """Refresh plots/curves.png: reward mean, zero-std ratio and group std over iterations."""
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.2))
        xs = [r["iteration"] for r in self.history]
        for ax, (key, title, log_scale) in zip(axes, PLOTTED, strict=True):
            ys = [r.get(key, float("nan")) for r in self.history]
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
            ax.set_title(title)
            ax.set_xlabel("iteration")
            if log_scale and all(y > 0 for y in ys if math.isfinite(y)):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.run_dir / "plots" / "curves.png"
        out.parent.mkdir(exist_ok=True)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_after(path: Path, iteration: int) -> None:
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["iteration"] <= iteration
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
