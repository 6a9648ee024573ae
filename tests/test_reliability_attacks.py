"""The hardening probe's attacks, full size, against a served model while a victim client scores
(``bench.attacks``): each is answered with the status a hardened server owes it, the victim's p99 stays
within 2× its quiet p99, and the server's memory stays within its stated bound."""

from __future__ import annotations

import pytest

from bench import attacks
from services.core.server import ServerConfig
from tests.test_reliability_fuzz import report

pytestmark = pytest.mark.reliability

P99_RATIO_BOUND = 2.0
P99_SLACK_MS = 5.0
"""Absolute slack on the 2× bound: one scheduler hiccup on a 2-core machine is ~5 ms."""
COPY_BOUND = ("60 MB unknown field", "8 streams: 47 MB part, stall")
"""Attacks whose cost is gRPC receiving and copying tens of MB (docs/reliability.md, known gaps): held to
their answers and the memory bounds; their victim latency is reported, not bounded."""


def test_attacks_are_refused_and_the_victim_is_unaffected() -> None:
    result = attacks.run(quick=False, repeats=3, victim_s=4.0, server_args=["--stream-idle-timeout-s", "2"])
    quiet_p99 = result["quiet"]["victim_p99_ms"]
    keep_freed_mb = (ServerConfig().malloc_trim_threshold_bytes or 0) / 2**20
    buffered_mb = 2 * 1024  # IntakeLimits.max_buffered_request_bytes
    for row in result["attacks"]:
        name = row["attack"]
        report(f"attack-{name}", **{k: v for k, v in row.items() if k != "attack"}, quiet_p99_ms=quiet_p99)
        assert row["as_expected"], (name, row["answers"])
        assert row["victim_errors"] == [], name
        if name not in COPY_BOUND:
            assert row["victim_p99_ms"] <= P99_RATIO_BOUND * quiet_p99 + P99_SLACK_MS, (name, row, quiet_p99)
        assert row["rss_peak_over_before_mb"] <= buffered_mb, name
        # Freed memory goes back to glibc, which keeps up to the server's malloc threshold for reuse.
        assert row["rss_after_over_before_mb"] <= keep_freed_mb, name
    unauthenticated = result["attacks"][0]
    assert unauthenticated["answers"] == ["UNAUTHENTICATED"] and unauthenticated["answer_ms_max"] < 100
