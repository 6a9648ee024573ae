"""Training-prompt selection by GenEval tag (the shapes-collapse preset's training set)."""

from __future__ import annotations

import pytest

from shapes.prompts import PromptSplitConfig, split_prompts
from trainer.prompts import PromptStream, load_records, with_prompts, with_tags


def test_with_tags_keeps_exactly_the_records_of_those_tags():
    records = load_records("shapes", "train")
    train, _ = split_prompts(PromptSplitConfig(), 0)
    expected = sorted(r["prompt"] for r in train if r["tag"] in ("single_object", "colors"))
    chosen = with_tags(records, ("single_object", "colors"))
    assert sorted(r["prompt"] for r in chosen) == expected and len(expected) < len(records)
    assert with_tags(records, ()) == records


def test_with_tags_refuses_a_selection_that_leaves_nothing():
    records = [{"prompt": "a photo of a circle", "tag": "single_object"}]
    with pytest.raises(ValueError, match="no training prompt has a tag in"):
        with_tags(records, ("position",))


def test_a_balanced_stream_over_two_tags_alternates_them():
    records = with_tags(load_records("shapes", "train"), ("single_object", "colors"))
    drawn = PromptStream(records, seed=0, balance_by_tag=True).next(10)
    assert [r["tag"] for r in drawn] == ["colors", "single_object"] * 5


def test_the_collapse_preset_draws_distinct_prompts_each_iteration():
    """Repeated draws of a prompt form one group, so a G = 4 arm must not see a prompt twice an iteration."""
    from trainer.config import build_config

    data = build_config("shapes-collapse").data
    records = with_prompts(with_tags(load_records("shapes", "train"), data.train_tags), data.train_prompts)
    stream = PromptStream(records, seed=3, balance_by_tag=data.balance_by_tag)
    for _ in range(3):  # every iteration is one whole epoch of the seven circle prompts
        drawn = [r["prompt"] for r in stream.next(data.num_prompts)]
        assert len(set(drawn)) == data.num_prompts == len(records) == 7


def test_with_prompts_keeps_exactly_the_named_records_and_refuses_unknown_names():
    records = with_tags(load_records("shapes", "train"), ("colors",))
    names = [r["prompt"] for r in records if r["prompt"].endswith(" circle")]
    chosen = with_prompts(records, names)
    assert sorted(r["prompt"] for r in chosen) == sorted(names) and 0 < len(chosen) < len(records)
    assert all(r["tag"] == "colors" and r["include"][0]["class"] == "circle" for r in chosen)
    assert with_prompts(records, ()) == records
    with pytest.raises(ValueError, match="no training record has: \\['a photo of a purple circel'\\]"):
        with_prompts(records, [*names, "a photo of a purple circel"])


def test_train_prompts_come_from_the_command_line_as_a_tuple():
    from trainer.config import build_config

    cfg = build_config("shapes", overrides=["data.train_prompts=a photo of a red circle,a photo of a circle"])
    assert cfg.data.train_prompts == ("a photo of a red circle", "a photo of a circle")
