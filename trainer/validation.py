"""Field checks shared by every config section: a bad value fails with the field's name, the value and
the allowed range, however the config was built (preset, ``--set``, a saved config.json)."""

from __future__ import annotations

import math
import typing
from typing import Any, Literal


def check(section: str, name: str, value: Any, ok: bool, allowed: str) -> None:
    """Refuse one field's value with a sentence naming the field, the value and what is allowed."""
    if not ok:
        raise ValueError(f"{section}.{name} = {value!r} is out of range: must be {allowed}")


def check_literals(section: str, config: Any) -> None:
    """Fields typed ``Literal[...]`` hold one of their values (config.json and --set can say anything)."""
    for name, tp in typing.get_type_hints(type(config)).items():
        if typing.get_origin(tp) is Literal:
            value = getattr(config, name)
            check(section, name, value, value in tp.__args__, f"one of {list(tp.__args__)}")


def positive(section: str, config: Any, *names: str, minimum: float = 0, strict: bool = True) -> None:
    for name in names:
        value = getattr(config, name)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and (value > minimum if strict else value >= minimum) and math.isfinite(value)
        check(section, name, value, ok, f"{'>' if strict else '>='} {minimum:g}")
