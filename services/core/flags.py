"""Command-line flags generated from config dataclasses: one ``--field-name`` per field, typed and
defaulted by the field and explained by its docstring.

The serving entry points take their batching, request, image and intake limits this way, so a field added
to a config is a flag at once, under the same name, with the same default and text, and a flag cannot
drift from what it configures. Fields holding a nested config are left to the caller.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import types
import typing
from typing import Any, Protocol


class ArgumentAdder(Protocol):
    """What flags are added to: the ``add_argument`` of an argparse parser or group (also what a scorer's
    ``add_arguments`` receives)."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action: ...


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name → its attribute docstring (the string literal right after the field), from the source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def none_or(kind: type) -> typing.Callable[[str], Any]:
    """Parser for an optional field: ``none`` → None, else ``kind(text)``."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = f"{kind.__name__} or none"
    return parse


def _parser(hint: Any) -> typing.Callable[[str], Any] | None:
    """argparse ``type`` for a field's annotation; None for a field that is not a plain value."""
    if hint in (int, float, str):
        return hint
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(kinds) == 1 and kinds[0] in (int, float, str) and len(typing.get_args(hint)) == 2:
            return none_or(kinds[0])
    return None


def flag_fields(cls: type, skip: frozenset[str] = frozenset()) -> list[dataclasses.Field]:
    """The fields of ``cls`` that become flags: plain int/float/str/optional values not in ``skip``."""
    hints = typing.get_type_hints(cls)
    return [f for f in dataclasses.fields(cls) if f.name not in skip and _parser(hints[f.name]) is not None]


def add_flags(parser: ArgumentAdder, cls: type, *, skip: frozenset[str] = frozenset()) -> None:
    """Add ``--field-name`` for every plain field of the dataclass ``cls`` (defaults from ``cls()``)."""
    hints, defaults, docs = typing.get_type_hints(cls), cls(), field_docs(cls)
    for f in flag_fields(cls, skip):
        default = getattr(defaults, f.name)
        text = docs.get(f.name, "")
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_parser(hints[f.name]),
            default=default,
            help=f"{text} (default: {default})".replace("%", "%%").strip(),
        )


def from_flags(
    args: argparse.Namespace, cls: type, *, skip: frozenset[str] = frozenset(), **rest: Any
) -> Any:
    """``cls`` built from the flags ``add_flags`` made, plus ``rest`` (the nested or skipped fields)."""
    return cls(**{f.name: getattr(args, f.name) for f in flag_fields(cls, skip)}, **rest)
