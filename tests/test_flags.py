"""Server flags are generated from the config dataclasses: every field a flag, with its default and its
docstring, and every flag reaches its field."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from bench import reward_server
from services import server_args
from services.core.batcher import BatcherConfig
from services.core.codec import ImageLimits
from services.core.flags import add_flags, field_docs, flag_fields, from_flags
from services.core.request import RequestLimits
from services.core.server import ServerConfig
from services.core.servicer import IntakeLimits

SERVED = {
    ServerConfig: lambda c: c,
    BatcherConfig: lambda c: c.batcher,
    RequestLimits: lambda c: c.limits,
    ImageLimits: lambda c: c.limits.image,
    IntakeLimits: lambda c: c.intake,
}
SKIPPED = {ServerConfig: server_args.SERVER_FLAG_SKIP}
"""Fields with a hand-written flag (the glibc threshold, given in MB)."""
NESTED = {
    RequestLimits: {"image"},
    ServerConfig: {"batcher", "limits", "intake", "quota", "token_file", "tls"},
}
"""Fields that hold another config (flags of their own), or a path or TLS files (flags written by hand)."""


def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


@pytest.mark.parametrize("cls", list(SERVED), ids=lambda c: c.__name__)
def test_every_field_is_a_serve_flag_with_its_default_and_docstring(cls) -> None:
    flags = actions(server_args.build_parser())
    defaults = cls()
    skipped = SKIPPED.get(cls, frozenset())
    plain = flag_fields(cls, skipped)
    nested = {f.name for f in dataclasses.fields(cls)} - {f.name for f in plain} - skipped
    assert nested == NESTED.get(cls, set())
    for field in plain:
        action = flags[field.name]
        assert action.option_strings == ["--" + field.name.replace("_", "-")]
        assert action.default == getattr(defaults, field.name)
        assert field_docs(cls)[field.name].split(".")[0] in " ".join(action.help.split())


def alternative(value):
    if value is None:
        return 1234
    if isinstance(value, str):
        return value + "0"
    return value + 1 if isinstance(value, int) else value * 1.5 + 0.5


@pytest.mark.parametrize(
    ("cls", "name"), [(c, f.name) for c in SERVED for f in flag_fields(c, SKIPPED.get(c, frozenset()))]
)
def test_every_serve_flag_reaches_its_field(cls, name) -> None:
    value = alternative(getattr(cls(), name))
    args = server_args.parse_args(["compressibility", "--" + name.replace("_", "-"), str(value)])
    assert getattr(SERVED[cls](server_args.config_from_args(args)), name) == value


def test_the_benchmark_server_takes_every_batcher_flag() -> None:
    args = reward_server.parse_args(["null", "--retry-grace-ms", "5", "--contention-latency-slack", "none"])
    config = from_flags(args, BatcherConfig)
    assert (config.retry_grace_ms, config.contention_latency_slack) == (5.0, None)
    assert dataclasses.replace(config, retry_grace_ms=1000.0, contention_latency_slack=0.1) == BatcherConfig()


def test_docstrings_are_read_from_the_source_and_percent_signs_survive_help() -> None:
    @dataclasses.dataclass(frozen=True)
    class Example:
        ratio: float = 0.5
        """Share of the batch, in % of its images."""
        name: str | None = None
        undocumented: int = 3

    parser = argparse.ArgumentParser()
    add_flags(parser, Example)
    assert field_docs(Example) == {"ratio": "Share of the batch, in % of its images."}
    assert "in % of its images" in parser.format_help()
    assert from_flags(parser.parse_args(["--name", "none", "--undocumented", "4"]), Example) == Example(
        undocumented=4
    )


def test_the_torchserve_config_command_takes_every_server_setting(capsys) -> None:
    from services.torchserve.__main__ import main
    from services.torchserve.config import ServerSettings

    with pytest.raises(SystemExit):
        main(["config", "--help"])
    text = capsys.readouterr().out
    for field in flag_fields(ServerSettings):
        assert "--" + field.name.replace("_", "-") in text
