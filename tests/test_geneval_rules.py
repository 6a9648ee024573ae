"""GenEval metadata validation and rule engine, checked against hand computations (REFERENCE.md §4)."""

import json

import numpy as np
import pytest

from services.geneval.metadata import Clause, Metadata, parse_metadata
from services.geneval.rules import (
    Detection,
    RuleConfig,
    evaluate,
    filter_detections,
    partial_credit,
    relative_position,
    score_threshold,
)
from tests.conftest import GENEVAL_SAMPLE, needs_geneval_sample


def det(
    x1: float, y1: float, x2: float, y2: float, *, score: float = 0.95, color: str | None = None
) -> Detection:
    return Detection(box=(x1, y1, x2, y2), score=score, color=color)


def boxes_in_a_row(n: int, *, score: float = 0.95, color: str | None = None) -> list[Detection]:
    """``n`` disjoint 10x10 boxes along the x axis."""
    return [det(20 * i, 0, 20 * i + 10, 10, score=score, color=color) for i in range(n)]


POSITION_RECORD = {
    "tag": "position",
    "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
    "prompt": "a photo of a cat left of a dog",
}
LEFT = (0, 0, 10, 10)
RIGHT = (100, 0, 110, 10)


# relative_position ------------------------------------------------------------------------------------------


def test_relative_position_horizontal_and_vertical():
    # offset x = 5 - 105 = -100, margin 0.1 * (10 + 10) = 2 -> revised -98, dx = -98 / 100 = -0.98.
    assert relative_position(LEFT, RIGHT) == {"left of"}
    assert relative_position(RIGHT, LEFT) == {"right of"}
    # y points down: the box with the smaller y is above.
    assert relative_position((0, 0, 10, 10), (0, 100, 10, 110)) == {"above"}
    assert relative_position((0, 100, 10, 110), (0, 0, 10, 10)) == {"below"}


def test_relative_position_diagonal_and_dominant_axis():
    # offset (-100, -100), revised (-98, -98), norm 141.42 -> dx = dy = -0.693: both relations.
    assert relative_position((0, 0, 10, 10), (100, 100, 110, 110)) == {"left of", "above"}
    # offset (-100, -30), revised (-98, -28), norm 104.40 -> dx = -0.939, dy = -0.268: horizontal only.
    assert relative_position((0, 0, 10, 10), (100, 30, 110, 40)) == {"left of"}


def test_relative_position_margin_cancels_small_offset():
    obj, target = (0, 0, 100, 100), (10, 0, 110, 100)
    # offset x = -10, margin 0.1 * (100 + 100) = 20 > 10 -> revised 0 on both axes: no relation.
    assert relative_position(obj, target) == frozenset()
    # Without the margin the same offset is a clean "left of" (dx = -10 / 10 = -1).
    assert relative_position(obj, target, margin=0.0) == {"left of"}
    assert relative_position(obj, obj) == frozenset()


def test_relative_position_normalises_by_raw_offset():
    # offset x = -30, margin 20 -> revised -10, dx = -10 / 30 = -0.33: above the -0.5 cut-off, no relation,
    # although the revised vector alone points purely left.
    assert relative_position((0, 0, 100, 100), (30, 0, 130, 100)) == frozenset()
    # offset x = -130 -> revised -110, dx = -110 / 130 = -0.85.
    assert relative_position((0, 0, 100, 100), (130, 0, 230, 100)) == {"left of"}


# filtering ----------------------------------------------------------------------------------------------


def test_filter_keeps_strictly_above_threshold_sorted_by_score():
    dets = [det(0, 0, 1, 1, score=s) for s in (0.3, 0.31, 0.95, 0.2)]
    kept = filter_detections({"dog": dets}, threshold=0.3, max_per_class=16)
    assert [d.score for d in kept["dog"]] == [0.95, 0.31]


def test_threshold_depends_on_tag():
    config = RuleConfig()
    assert score_threshold("counting", config) == 0.9
    assert score_threshold("single_object", config) == 0.3
    assert score_threshold("counting", RuleConfig(counting_score_threshold=0.8)) == 0.8


def test_counting_tag_drops_boxes_below_point_nine():
    meta = parse_metadata(
        {
            "tag": "counting",
            "include": [{"class": "donut", "count": 2}],
            "exclude": [{"class": "donut", "count": 3}],
        }
    )
    dets = [det(20 * i, 0, 20 * i + 10, 10, score=s) for i, s in enumerate((0.95, 0.92, 0.85, 0.5))]
    # Only 0.95 and 0.92 pass 0.9: exactly two donuts.
    assert evaluate(meta, {"donut": dets}) == evaluate(meta, {"donut": dets[:2]})
    result = evaluate(meta, {"donut": dets})
    assert (result.score, result.strict, result.correct) == (1.0, True, True)
    # Under the ordinary 0.3 threshold all four would count: 1 - |2 - 4| / 2 = 0.
    lenient = evaluate(meta, {"donut": dets}, RuleConfig(counting_score_threshold=0.3))
    assert lenient.score == pytest.approx(0.0)
    assert not lenient.correct


def test_at_most_sixteen_per_class():
    dets = [det(0, 0, 1, 1, score=0.5 + 0.02 * i) for i in range(20)]
    kept = filter_detections({"vase": dets}, threshold=0.3, max_per_class=16)["vase"]
    assert len(kept) == 16
    assert kept[0].score == pytest.approx(0.88) and kept[-1].score == pytest.approx(0.58)
    meta = parse_metadata({"tag": "single_object", "include": [{"class": "vase", "count": 1}]})
    # 16 kept of 20: 1 - |1 - 16| / 1 = -14.
    assert evaluate(meta, {"vase": dets}).score == pytest.approx(-14.0)
    # With a cap of 3: 1 - |1 - 3| / 1 = -1.
    assert evaluate(meta, {"vase": dets}, RuleConfig(max_per_class=3)).score == pytest.approx(-1.0)


# partial-credit reward -------------------------------------------------------------------------------------

COUNTING_TWO = {
    "tag": "counting",
    "include": [{"class": "bicycle", "count": 2}],
    "exclude": [{"class": "bicycle", "count": 3}],
}


@pytest.mark.parametrize(
    ("num_found", "expected_score"),
    [
        (2, 1.0),  # exact
        (3, 0.5),  # 1 - |2 - 3| / 2
        (1, 0.5),  # 1 - |2 - 1| / 2
        (0, 0.0),  # 1 - |2 - 0| / 2
        (5, -0.5),  # 1 - |2 - 5| / 2: over-counting goes negative
    ],
)
def test_counting_credit(num_found, expected_score):
    result = evaluate(parse_metadata(COUNTING_TWO), {"bicycle": boxes_in_a_row(num_found)})
    assert result.score == pytest.approx(expected_score)
    assert result.strict == (num_found == 2)
    assert result.tag == "counting"


def test_colour_partial_credit():
    meta = parse_metadata({"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]})
    dets = [det(0, 0, 10, 10, color="red"), det(20, 0, 30, 10, color="blue", score=0.9)]
    result = evaluate(meta, {"car": dets})
    # count credit 1 - 0/2 = 1, colour credit 1 - |2 - 1| / 2 = 0.5 -> mean 0.75.
    assert result.score == pytest.approx((1.0 + 0.5) / 2)
    assert not result.strict
    assert not result.correct  # one red of the top two < 2


def test_wrong_count_with_colour_appends_a_single_zero():
    meta = parse_metadata({"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]})
    # One red car: count credit 1 - 1/2 = 0.5, then one 0.0 for the unchecked colour.
    result = evaluate(meta, {"car": [det(0, 0, 10, 10, color="red")]})
    assert result.score == pytest.approx((0.5 + 0.0) / 2)


def test_two_clause_colour_attr():
    meta = parse_metadata(
        {
            "tag": "color_attr",
            "include": [
                {"class": "cow", "count": 1, "color": "orange"},
                {"class": "sandwich", "count": 1, "color": "purple"},
            ],
        }
    )
    detections = {
        "cow": [det(0, 0, 10, 10, color="orange")],
        "sandwich": [det(50, 0, 60, 10, color="purple"), det(80, 0, 90, 10, score=0.5, color="green")],
    }
    result = evaluate(meta, detections)
    # cow: count 1, colour 1. sandwich: two found -> 1 - |1 - 2| / 1 = 0, plus 0.0 for the colour.
    assert result.score == pytest.approx((1.0 + 1.0 + 0.0 + 0.0) / 4)
    assert not result.strict
    # GenEval only looks at the top sandwich, which is purple.
    assert result.correct


def test_position_satisfied():
    result = evaluate(parse_metadata(POSITION_RECORD), {"dog": [det(*RIGHT)], "cat": [det(*LEFT)]})
    # dog count 1; cat count 1, position 1.
    assert result.score == pytest.approx(1.0)
    assert result.strict and result.correct


@pytest.mark.parametrize(
    ("extra_position_credit", "expected_score"),
    [
        (False, (1.0 + 1.0 + 0.0) / 3),
        (True, (1.0 + 1.0 + 0.0 + 1.0) / 4),  # upstream quirk: an extra 1.0 after the failed relation
    ],
)
def test_position_violated_and_quirk(extra_position_credit, expected_score):
    config = RuleConfig(extra_position_credit=extra_position_credit)
    result = evaluate(parse_metadata(POSITION_RECORD), {"dog": [det(*LEFT)], "cat": [det(*RIGHT)]}, config)
    assert result.score == pytest.approx(expected_score)
    assert not result.strict
    assert not result.correct


@pytest.mark.parametrize("extra_position_credit", [False, True])
def test_position_against_unmatched_earlier_clause_appends_zero(extra_position_credit):
    config = RuleConfig(extra_position_credit=extra_position_credit)
    result = evaluate(parse_metadata(POSITION_RECORD), {"cat": [det(*LEFT)]}, config)
    # dog: 1 - |1 - 0| / 1 = 0; cat: count 1, then 0.0 because its target group is missing; no quirk credit.
    assert result.score == pytest.approx((0.0 + 1.0 + 0.0) / 3)
    assert not result.strict
    assert not result.correct


def test_position_clause_with_wrong_count_appends_single_zero():
    result = evaluate(
        parse_metadata(POSITION_RECORD), {"dog": [det(*RIGHT)], "cat": [det(*LEFT), det(20, 0, 30, 10)]}
    )
    # dog 1; cat: 1 - |1 - 2| / 1 = 0, then one 0.0 for the position that could not be checked.
    assert result.score == pytest.approx((1.0 + 0.0 + 0.0) / 3)


def test_failed_colour_skips_position_credit():
    meta = parse_metadata(
        {
            "tag": "position",
            "include": [
                {"class": "dog", "count": 1},
                {"class": "cat", "count": 1, "color": "black", "position": ["left of", 0]},
            ],
        }
    )
    result = evaluate(meta, {"dog": [det(*RIGHT)], "cat": [det(*LEFT, color="white")]})
    # dog 1; cat count 1, colour 1 - 1/1 = 0, and no position entry once the colour failed.
    assert result.score == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert not result.strict


def test_nothing_appended_scores_zero():
    assert partial_credit(Metadata(tag="single_object", include=()), {}, RuleConfig()) == (0.0, True)


# original GenEval correctness vs strict ------------------------------------------------------------------


def test_correct_accepts_extra_boxes_that_training_reward_penalises():
    meta = parse_metadata({"tag": "single_object", "include": [{"class": "boat", "count": 1}]})
    result = evaluate(meta, {"boat": boxes_in_a_row(2)})
    # Training: 1 - |1 - 2| / 1 = 0 and not strict. GenEval: the top-1 boat exists, no exclude clause.
    assert result.score == pytest.approx(0.0)
    assert not result.strict
    assert result.correct


def test_correct_position_uses_top_count_boxes_only():
    dogs = [det(*RIGHT), det(-100, 0, -90, 10, score=0.5)]  # the second dog sits left of the cat
    result = evaluate(parse_metadata(POSITION_RECORD), {"dog": dogs, "cat": [det(*LEFT)]})
    # Training: dog 1 - |1 - 2| / 1 = 0 -> unmatched; cat count 1, then 0.0 for the missing target.
    assert result.score == pytest.approx((0.0 + 1.0 + 0.0) / 3)
    assert not result.strict
    # GenEval: the top dog is right of the cat.
    assert result.correct


def test_correct_colour_judged_on_top_count_boxes():
    meta = parse_metadata({"tag": "colors", "include": [{"class": "backpack", "count": 1, "color": "red"}]})
    top_red = [det(0, 0, 10, 10, score=0.9, color="red"), det(20, 0, 30, 10, score=0.8, color="blue")]
    top_blue = [det(0, 0, 10, 10, score=0.8, color="red"), det(20, 0, 30, 10, score=0.9, color="blue")]
    assert evaluate(meta, {"backpack": top_red}).correct
    assert not evaluate(meta, {"backpack": top_blue}).correct
    # Training reward: 1 - |1 - 2| / 1 = 0 plus 0.0 for the colour, in both cases.
    assert evaluate(meta, {"backpack": top_red}).score == pytest.approx(0.0)


def test_correct_fails_with_too_few_boxes():
    result = evaluate(parse_metadata(COUNTING_TWO), {"bicycle": boxes_in_a_row(1)})
    assert not result.correct
    assert result.score == pytest.approx(0.5)


def test_exclude_clause():
    meta = parse_metadata(COUNTING_TWO)
    # Three bicycles: top-2 satisfy the include clause, but 3 >= the exclude count 3.
    assert not evaluate(meta, {"bicycle": boxes_in_a_row(3)}).correct
    assert evaluate(meta, {"bicycle": boxes_in_a_row(2)}).correct
    # The exclude clause only counts kept boxes: a third box below 0.9 does not trigger it.
    assert evaluate(meta, {"bicycle": [*boxes_in_a_row(2), det(100, 0, 110, 10, score=0.6)]}).correct


def test_missing_colour_is_an_error():
    meta = parse_metadata({"tag": "colors", "include": [{"class": "carrot", "count": 1, "color": "purple"}]})
    with pytest.raises(ValueError, match=r"Detection\.color"):
        evaluate(meta, {"carrot": [det(0, 0, 10, 10)]})


def test_colour_not_needed_may_be_absent():
    meta = parse_metadata({"tag": "single_object", "include": [{"class": "carrot", "count": 1}]})
    assert evaluate(meta, {"carrot": [det(0, 0, 10, 10)]}).strict


# detections and config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"box": (0, 0, 1), "score": 0.5}, "box"),
        ({"box": (5, 0, 1, 1), "score": 0.5}, "box"),
        ({"box": (0, 0, 1, 1), "score": float("nan")}, "score"),
        ({"box": (0, 0, 1, 1), "score": 0.5, "color": "teal"}, "color"),
        ({"box": (0, 0, 1, 1), "score": 0.5, "mask": np.zeros((2, 2), dtype=np.uint8)}, "mask"),
    ],
)
def test_detection_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"Detection\.{field}"):
        Detection(**kwargs)


def test_detection_keeps_mask():
    mask = np.zeros((4, 4), dtype=bool)
    assert Detection(box=(0, 0, 1, 1), score=0.5, mask=mask).mask is mask


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"score_threshold": 1.5}, "score_threshold"),
        ({"counting_score_threshold": -0.1}, "counting_score_threshold"),
        ({"max_per_class": 0}, "max_per_class"),
        ({"position_margin": -0.1}, "position_margin"),
        ({"position_cutoff": 1.0}, "position_cutoff"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"RuleConfig\.{field}"):
        RuleConfig(**kwargs)


# metadata ------------------------------------------------------------------------------------------------


@needs_geneval_sample
def test_parse_sample_file():
    lines = GENEVAL_SAMPLE.read_text().splitlines()
    assert len(lines) == 12
    parsed = [parse_metadata(line) for line in lines]
    assert parsed[0].include == (
        Clause(cls="cow", count=1, color="orange"),
        Clause(cls="sandwich", count=1, color="purple"),
    )
    assert parsed[5].tag == "counting"
    assert parsed[5].include == (Clause(cls="donut", count=4),)
    assert parsed[5].exclude == (Clause(cls="donut", count=5),)
    assert parsed[5].prompt == "a photo of four donuts"
    # A JSON string and the decoded mapping give the same record.
    assert parsed[7] == parse_metadata(json.loads(lines[7]))
    assert {m.tag for m in parsed} == {"single_object", "counting", "colors", "color_attr"}


def test_parse_position_and_known_classes():
    meta = parse_metadata(POSITION_RECORD, known_classes={"dog", "cat"})
    assert meta.include[1] == Clause(cls="cat", count=1, position=("left of", 0))
    assert meta.exclude == ()


def _with_clause(**overrides):
    clause = {"class": "dog", "count": 1, **overrides}
    return {"tag": "single_object", "include": [clause]}


def _position_record(position):
    return {
        "tag": "position",
        "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": position}],
    }


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"tag": "single_object", "include": [', "JSON"),
        ("[1, 2]", "metadata"),
        ({"include": [{"class": "dog", "count": 1}]}, "tag"),
        ({"tag": "three_object", "include": [{"class": "dog", "count": 1}]}, "tag"),
        ({"tag": "single_object"}, "include"),
        ({"tag": "single_object", "include": []}, "include"),
        ({**_with_clause(), "exclude": {"class": "dog", "count": 2}}, "exclude"),
        ({**_with_clause(), "exlude": []}, "exlude"),
        ({**_with_clause(), "prompt": 3}, "prompt"),
        ({"tag": "single_object", "include": ["dog"]}, r"include\[0\]"),
        (_with_clause(colour="red"), r"include\[0\].*colour"),
        (_with_clause(**{"class": ""}), r"include\[0\]\.class"),
        (_with_clause(count=0), r"include\[0\]\.count"),
        (_with_clause(count=-2), r"include\[0\]\.count"),
        (_with_clause(count=1.5), r"include\[0\]\.count"),
        (_with_clause(count="2"), r"include\[0\]\.count"),
        (_with_clause(count=True), r"include\[0\]\.count"),
        (_with_clause(color="teal"), r"include\[0\]\.color"),
        ({**_with_clause(), "exclude": [{"class": "dog", "count": 0}]}, r"exclude\[0\]\.count"),
        (
            {**_with_clause(), "exclude": [{"class": "dog", "count": 2, "color": "red"}]},
            r"exclude\[0\].*color",
        ),
        (_position_record(["near", 0]), r"include\[1\]\.position\[0\]"),
        (_position_record(["left of", 2]), r"include\[1\]\.position\[1\].*0\.\.1"),
        (_position_record(["left of", -1]), r"include\[1\]\.position\[1\].*0\.\.1"),
        (_position_record(["left of", 1]), r"include\[1\]\.position\[1\].*earlier"),
        (_position_record(["left of", "0"]), r"include\[1\]\.position\[1\]"),
        (_position_record(["left of"]), r"include\[1\]\.position"),
        (_position_record("left of 0"), r"include\[1\]\.position"),
        (
            {"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["left of", 0]}]},
            r"include\[0\]\.position",
        ),
    ],
)
def test_metadata_validation(raw, field):
    with pytest.raises(ValueError, match=field) as err:
        parse_metadata(raw)
    message = str(err.value)
    assert message.endswith(".") and "\n" not in message


def test_unknown_class_rejected():
    with pytest.raises(ValueError, match=r"include\[1\]\.class"):
        parse_metadata(POSITION_RECORD, known_classes={"dog"})
    with pytest.raises(ValueError, match=r"exclude\[0\]\.class"):
        parse_metadata({**_with_clause(), "exclude": [{"class": "cat", "count": 1}]}, known_classes={"dog"})
