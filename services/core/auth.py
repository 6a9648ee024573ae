"""Bearer-token authentication per team.

The token file (mounted from a Kubernetes Secret) has one client per line::

    # name:token[:models[:images_per_s]]
    team-vision:3f9c...e1
    team-eval:a71b...02:geneval,pickscore
    team-batch:c0de...77:*:50

The *name* is the client's identity everywhere else: its fairness queue, its quota, its metrics label
and its log lines; the token itself is never logged or exported. The optional model list restricts the
token to those scorers (others answer PERMISSION_DENIED); ``*`` means every model. The optional fourth
field is the client's quota in images per second, overriding the server's ``--quota-images-per-s``.
Tokens are compared in constant time against every entry so timing reveals neither a prefix nor which
entry matched.
"""

from __future__ import annotations

import hmac
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from services.core.metadata_keys import AUTHORIZATION_KEY

EntrySpec = tuple[str, str, frozenset[str] | None] | tuple[str, str, frozenset[str] | None, float | None]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MIN_TOKEN_CHARS = 16


class AuthError(Exception):
    """Authentication failed; ``permission`` distinguishes a known token used where it is not allowed."""

    def __init__(self, message: str, *, permission: bool = False) -> None:
        super().__init__(message)
        self.permission = permission


@dataclass(frozen=True)
class Principal:
    name: str
    models: frozenset[str] | None  # None = every model
    images_per_s: float | None = None  # the client's own quota; None = the server default


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    token: bytes


class TokenAuthenticator:
    """Maps ``authorization: Bearer <token>`` request metadata to a :class:`Principal`."""

    def __init__(self, entries: Iterable[EntrySpec]) -> None:
        """``entries``: (name, token, models) or (name, token, models, images_per_s); models None = all."""
        self._entries: list[_Entry] = []
        seen_names: set[str] = set()
        seen_tokens: set[str] = set()
        for name, token, models, *rest in entries:
            images_per_s = rest[0] if rest else None
            if not _NAME.match(name):
                raise ValueError(f"client name {name!r} must be 1-63 chars of letters, digits, '_', '.', '-'")
            if len(token) < MIN_TOKEN_CHARS:
                raise ValueError(f"token of {name!r} has {len(token)} chars, need at least {MIN_TOKEN_CHARS}")
            if name in seen_names or token in seen_tokens:
                raise ValueError(f"duplicate client name or token for {name!r}")
            if images_per_s is not None and not (math.isfinite(images_per_s) and images_per_s > 0):
                raise ValueError(f"quota of {name!r} must be a positive images/s, got {images_per_s}")
            seen_names.add(name)
            seen_tokens.add(token)
            self._entries.append(_Entry(Principal(name, models, images_per_s), token.encode()))
        if not self._entries:
            raise ValueError("token file defines no clients")

    @classmethod
    def from_file(cls, path: str | Path) -> TokenAuthenticator:
        entries = []
        for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(":")
            if len(parts) not in (2, 3, 4) or not parts[0] or not parts[1]:
                raise ValueError(
                    f"{path}:{number}: expected 'name:token', 'name:token:model,model' or "
                    "'name:token:models:images_per_s'"
                )
            models = _parse_models(parts[2]) if len(parts) >= 3 else None
            if models is not None and not models:
                # An empty list would make a token that can use nothing: always a typo for '*'.
                raise ValueError(f"{path}:{number}: empty model list; write '*' for every model")
            images_per_s = None
            if len(parts) == 4:
                try:
                    images_per_s = float(parts[3])
                except ValueError:
                    raise ValueError(
                        f"{path}:{number}: quota must be a number of images/s, got {parts[3].strip()!r}"
                    ) from None
            entries.append((parts[0].strip(), parts[1].strip(), models, images_per_s))
        return cls(entries)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]], model: str) -> Principal:
        """Return the caller's principal or raise AuthError (never says which part was wrong)."""
        header = next((str(v) for k, v in metadata if k == AUTHORIZATION_KEY), None)
        if header is None:
            raise AuthError("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("authorization metadata must be 'Bearer <token>'")
        candidate = token.strip().encode()
        match: Principal | None = None
        for entry in self._entries:  # no early exit: constant work whatever matches
            if hmac.compare_digest(candidate, entry.token):
                match = entry.principal
        if match is None:
            raise AuthError("invalid token")
        if match.models is not None and model not in match.models:
            raise AuthError(f"client {match.name!r} may not use model {model!r}", permission=True)
        return match


def _parse_models(field: str) -> frozenset[str] | None:
    """'geneval,pickscore' → that set; '*' → None (every model)."""
    names = frozenset(m.strip() for m in field.split(",") if m.strip())
    return None if names == {"*"} else names
