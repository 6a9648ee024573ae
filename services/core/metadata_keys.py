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

RETRY_TICKET_KEY = "x-e2po-retry-ticket"
"""Names a call's place in line for a full server queue (services.core.waitlist). Request metadata:
``new`` on a call's first try, then the ticket its last refusal carried; trailing metadata of that
refusal: the ticket. A client that never sends it shares one place among all of its calls."""
NEW_TICKET = "new"
MAX_TICKET_CHARS = 32


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata carrying ``token`` (none without one)."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else ()
