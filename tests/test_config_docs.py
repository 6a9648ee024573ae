"""Every config section lives with the component it configures and documents each of its fields.

Read from the source, as a reader (and ``help()``) sees it: a field's docstring is the string literal
that follows its annotated assignment in the class body.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

import pytest

from trainer.config import TrainConfig
from trainer.rewards import RewardSpec

SECTIONS = [f.default_factory for f in dataclasses.fields(TrainConfig)] + [RewardSpec]
HOMES = {
    "model": "trainer.model",
    "data": "trainer.prompts",
    "perturb": "trainer.perturb",
    "rollout": "trainer.rollout",
    "nft": "trainer.nft",
    "optim": "trainer.update",
    "reward": "trainer.rewards",
    "run": "trainer.config",
}


def documented_fields(cls: type) -> dict[str, bool]:
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    out = {}
    for node, after in zip(body, [*body[1:], None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            value = after.value if isinstance(after, ast.Expr) else None
            text = value.value if isinstance(value, ast.Constant) else None
            out[node.target.id] = isinstance(text, str) and bool(text.strip())
    return out


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_every_field_of_every_section_has_a_docstring(cls: type) -> None:
    fields = documented_fields(cls)
    assert set(fields) == {f.name for f in dataclasses.fields(cls)}  # the parse saw every field
    assert [name for name, doc in fields.items() if not doc] == []
    assert (cls.__doc__ or "").strip() and not cls.__doc__.startswith(cls.__name__ + "(")  # not the repr


def test_each_section_is_defined_next_to_its_component() -> None:
    homes = {f.name: f.default_factory.__module__ for f in dataclasses.fields(TrainConfig)}
    assert homes == HOMES  # the run's own section, RunConfig, has no other home than the config
