"""Prompt sources: which prompts (with their reward metadata) each iteration trains on.

Records are GenEval-format dicts ({"prompt", "tag", "include", ...}); for rewards without metadata a
record may hold only "prompt". The draw order is a pure function of (seed, position), so the state to
checkpoint is a single integer and a resumed run sees exactly the prompts it would have seen.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.geneval.metadata import TAGS as GENEVAL_TAGS
from trainer.validation import check, positive

Record = dict[str, Any]


@dataclass(kw_only=True)
class DataConfig:
    """Where prompts (and their reward metadata) come from."""

    train: str = "shapes"
    """JSONL file of {"prompt", ...metadata} records (GenEval metadata format), or ``shapes`` for the
    shapes world's generated train split."""
    test: str = "shapes"
    """Held-out prompts for evaluation, same format."""
    num_prompts: int = 48
    """Prompts per iteration, over all ranks (each prompt gets G·K samples). **choice**: DiffusionNFT's
    48 groups per epoch."""
    train_tags: tuple[str, ...] = ()
    """Train only on records with these GenEval tags (empty: every record). The held-out set is not
    filtered, so a run trained on a few easy tags can saturate its training reward while the held-out
    score still has room (the ``shapes-collapse`` preset)."""
    train_prompts: tuple[str, ...] = ()
    """Train only on the records with exactly these prompts, among those ``train_tags`` keeps (empty:
    all of them). Every name must match a record, so a typo fails at the start, not as a smaller run.
    The ``shapes-collapse`` preset trains on the prompts the prior already half solves."""
    balance_by_tag: bool = True
    """Draw training prompts tag by tag in turn (every tag trains equally, however few prompts it has),
    or uniformly over the records (False). A tag with fewer prompts than its share of an iteration's
    draws repeats them within the iteration, and repeated draws of a prompt form one group."""

    def __post_init__(self) -> None:
        for name in ("train", "test"):
            check("data", name, getattr(self, name), bool(getattr(self, name)), "a JSONL path or 'shapes'")
        positive("data", self, "num_prompts")
        unknown = [t for t in self.train_tags if t not in GENEVAL_TAGS]
        check("data", "train_tags", self.train_tags, not unknown, f"GenEval tags from {list(GENEVAL_TAGS)}")


def load_records(source: str, split: str, seed: int = 0) -> list[Record]:
    """Records of a JSONL file, or of the shapes world's generated ``train``/``test`` split."""
    if source == "shapes":
        from shapes.prompts import PromptSplitConfig, split_prompts

        train, test = split_prompts(PromptSplitConfig(), seed)
        return [dict(r) for r in (train if split == "train" else test)]
    records = []
    for number, line in enumerate(Path(source).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{source}:{number}: each line must be a JSON object with a string 'prompt'")
        records.append(record)
    if not records:
        raise ValueError(f"{source}: no prompts")
    return records


def with_tags(records: Sequence[Record], tags: Sequence[str]) -> list[Record]:
    """The records whose GenEval tag is one of ``tags`` (all of them when ``tags`` is empty)."""
    if not tags:
        return list(records)
    chosen = [r for r in records if r.get("tag") in tags]
    if not chosen:
        raise ValueError(f"no training prompt has a tag in {list(tags)}")
    return chosen


def with_prompts(records: Sequence[Record], prompts: Sequence[str]) -> list[Record]:
    """The records whose prompt is one of ``prompts`` (all of them when ``prompts`` is empty)."""
    if not prompts:
        return list(records)
    wanted = set(prompts)
    missing = sorted(wanted - {r["prompt"] for r in records})
    if missing:
        raise ValueError(f"data.train_prompts names prompts no training record has: {missing}")
    return [r for r in records if r["prompt"] in wanted]


class PromptStream:
    """An endless, reproducible stream of records, optionally balanced across GenEval tags.

    Balanced: draws cycle through the tags in a fixed order, so a split dominated by one tag (as the
    shapes train split is by color_attr) still trains every tag equally. Within a stream (a tag, or the
    whole set), each epoch is a fresh permutation seeded by (seed, stream, epoch).
    """

    def __init__(self, records: Sequence[Record], *, seed: int, balance_by_tag: bool = False) -> None:
        self.seed = seed
        if balance_by_tag:
            tags = sorted({str(r.get("tag", "")) for r in records})
            self.streams = [[r for r in records if str(r.get("tag", "")) == t] for t in tags]
        else:
            self.streams = [list(records)]
        self.position = 0

    def _draw(self, position: int) -> Record:
        num = len(self.streams)
        stream_id, turn = position % num, position // num
        stream = self.streams[stream_id]
        epoch, offset = divmod(turn, len(stream))
        order = np.random.default_rng([self.seed, stream_id, epoch]).permutation(len(stream))
        return stream[int(order[offset])]

    def next(self, count: int) -> list[Record]:
        records = [self._draw(self.position + i) for i in range(count)]
        self.position += count
        return records

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"prompt stream seed {state['seed']} differs from the run's {self.seed}")
        self.position = int(state["position"])


def reward_metadata(record: Record) -> Record | None:
    """The metadata a reward service receives: the GenEval record, or None for a bare prompt."""
    return record if "include" in record else None
