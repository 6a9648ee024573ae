"""constraints.txt: the exact versions `make` and the Dockerfile install, checked against pyproject.toml
(every declared requirement pinned, each pin inside its declared range) and against this venv (what is
installed is what is pinned, so `make` really used the file)."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line.strip())
        assert match, f"constraints.txt:{number}: {line!r} is not an exact pin NAME==VERSION"
        name = canonicalize_name(match.group(1))
        assert name not in found, f"constraints.txt:{number}: {name} is pinned twice"
        found[name] = Version(match.group(2))
    return found


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += [r for r in extra if not r.startswith("e2po[")]
    return [Requirement(line) for line in lines]


def test_every_declared_requirement_is_pinned_inside_its_range() -> None:
    pinned = pins()
    problems = []
    for requirement in declared():
        version = pinned.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement} is not in constraints.txt (run `make lock`)")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement}: constraints.txt pins {version}, outside the declared range")
    assert problems == []


def test_the_installed_venv_holds_the_pinned_versions() -> None:
    pinned = pins()
    installed = {
        canonicalize_name(d.metadata["Name"]): Version(d.version) for d in importlib.metadata.distributions()
    }
    # A local build label (torch 2.14.1+cpu from PyTorch's CPU index) satisfies the pin 2.14.1, as pip's
    # == does; everything else must match exactly.
    wrong = {
        name: (str(pinned[name]), str(version))
        for name, version in installed.items()
        if name in pinned and Version(version.public) != pinned[name]
    }
    assert wrong == {}, "installed versions differ from constraints.txt (pinned, installed)"
    # The check means something only in a venv made by `make`: the pinned dev extra is installed.
    assert {"torch", "grpcio", "diffusers", "pytest"} <= installed.keys()


def test_make_and_the_image_install_with_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "-e " in line]
    unconstrained = [line.strip() for line in installs if "-c constraints.txt" not in line]
    assert [line for line in unconstrained if "LOCK_VENV" not in line] == []
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"COPY [^\n]*constraints\.txt", dockerfile)
    assert re.search(r"pip install [^\n]*-c constraints\.txt -r /tmp/requirements\.txt", dockerfile)
