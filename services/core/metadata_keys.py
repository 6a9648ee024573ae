"""The gRPC metadata keys of the reward contract, shared by the servers, the clients and the benchmarks."""

from __future__ import annotations

AUTHORIZATION_KEY = "authorization"
"""``Bearer <token>``: the caller's team token (services.core.auth)."""
CLIENT_KEY = "x-e2po-client"
"""Metadata naming the caller on a server without auth; it keys the fairness queue only.

Channels to the same target share one HTTP/2 connection inside a gRPC process, so the peer address
cannot tell two trainers in one process apart; with auth on, the token's name is used instead."""
RETRY_AFTER_KEY = "retry-after-ms"
"""Trailing metadata of a RESOURCE_EXHAUSTED answer: how long to wait before retrying."""


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata carrying ``token`` (none without one)."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else ()
