"""Places in line for requests refused by a full server queue (services.core.waitlist)."""

from __future__ import annotations

import pytest

from services.core.waitlist import Waitlist


def test_places_are_served_in_the_order_they_were_taken_and_kept_on_a_second_refusal() -> None:
    line = Waitlist(grace_s=1.0, capacity=100)
    line.hold("a", 3, retry_after_s=0.1, now=0.0)
    line.hold("b", 5, retry_after_s=0.1, now=0.0)
    line.hold("a", 2, retry_after_s=0.1, now=0.5)  # refused again: stays first, keeps its 3
    assert (line.ahead_of("a", 0.5), line.ahead_of("b", 0.5), line.ahead_of("newcomer", 0.5)) == (0, 3, 8)
    line.release("a")
    assert (line.ahead_of("b", 0.5), line.ahead_of("newcomer", 0.5)) == (0, 5)


def test_a_place_lapses_after_its_hint_and_the_grace() -> None:
    line = Waitlist(grace_s=0.5, capacity=100)
    line.hold("gone", 4, retry_after_s=0.2, now=10.0)
    assert line.ahead_of("other", 10.69) == 4
    assert line.ahead_of("other", 10.71) == 0 and len(line) == 0


def test_places_hold_at_most_the_line_s_capacity_in_images() -> None:
    line = Waitlist(grace_s=1.0, capacity=8)
    for name in ("n1", "n2", "n3"):  # made-up names: the third does not fit
        line.hold(name, 4, retry_after_s=0.1, now=0.0)
    assert len(line) == 2 and line.ahead_of("anyone", 0.0) == 8


def test_keep_extends_a_place_that_still_exists_and_creates_none() -> None:
    line = Waitlist(grace_s=0.5, capacity=100)
    line.hold("a", 4, retry_after_s=0.1, now=0.0)
    assert line.keep("a", retry_after_s=1.0, now=0.5)  # due at 0.6: extended to 2.0
    assert line.ahead_of("other", 1.9) == 4 and line.ahead_of("other", 2.01) == 0
    assert not line.keep("a", retry_after_s=1.0, now=3.0) and len(line) == 0


def test_negative_grace_is_refused() -> None:
    with pytest.raises(ValueError, match="grace_s must be >= 0"):
        Waitlist(grace_s=-1.0, capacity=8)
