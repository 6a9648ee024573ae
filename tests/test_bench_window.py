"""The closed-loop benchmark window measures a batching server's throughput without a lump's bias."""

from __future__ import annotations

import pytest

from bench.window import Record, Window, WindowConfig


def _run(window: Window, answers: list[tuple[float, int, int]]) -> dict:
    """Feed (answer time, client, images) in time order, each request sent at the client's previous
    answer (closed loop, no think time), until the window closes."""
    last_answer: dict[int, float] = {}
    for end, client, images in sorted(answers):
        window.record(
            Record(client=client, start=last_answer.get(client, 0.0), end=end, images=images, ok=True)
        )
        last_answer[client] = end
        if window.t_close is not None:
            break
    return window.summary()


@pytest.mark.parametrize("duration_s", [3.0, 6.0, 6.3])
def test_lumpy_answers_of_a_batching_server_are_counted_at_their_true_rate(duration_s: float) -> None:
    # 8 clients × 4 images in two cohorts: each 0.5 s batch of 16 images answers one cohort's four
    # clients 1 ms apart. The server's true rate is 16 / 0.5 = 32 images/s.
    period, clients = 0.5, 8
    answers = [
        (k * period + 0.001 * position, client, 4)
        for k in range(1, 200)
        for position, client in enumerate(c for c in range(clients) if c % 2 == k % 2)
    ]
    window = Window(num_clients=clients, config=WindowConfig(duration_s=duration_s, min_requests=2))
    summary = _run(window, answers)
    assert summary["seconds"] >= duration_s
    assert summary["images_per_s"] == pytest.approx(32.0, rel=0.01)


def test_independent_clients_are_counted_at_their_true_rate() -> None:
    # 5 clients, each answered every 0.4 s with 2 images, phases spread: 25 images/s in all.
    answers = [(k * 0.4 + 0.08 * client, client, 2) for k in range(1, 100) for client in range(5)]
    summary = _run(Window(num_clients=5, config=WindowConfig(duration_s=4.0, min_requests=3)), answers)
    assert summary["images_per_s"] == pytest.approx(25.0, rel=0.01)
    assert summary["requests"] >= 5 * 3  # every client answered min_requests times inside


def test_window_closes_after_max_s_even_if_a_client_starves() -> None:
    # Client 1 gets one answer, then none: the window gives up at max_s instead of waiting forever.
    answers = [(0.1, 1, 1)] + [(0.1 * k, 0, 1) for k in range(2, 400)]
    window = Window(num_clients=2, config=WindowConfig(duration_s=1.0, min_requests=2, max_s=5.0))
    summary = _run(window, answers)
    assert 5.0 <= summary["seconds"] < 5.2
