"""Imports point one way between the top-level packages: protos ← services ← shapes ← trainer ← bench.

services (the reward servers and the torch-free GenEval format) must not need the shapes world or the
trainer; shapes (a testbed model, its data and detector) must not need the trainer; the trainer must not
need the benchmarks. Lazy imports inside functions count too. The one link across is documented:
the GenEval service's ``shapes`` detector adaptor wraps the shapes world's exact detector.

Commands are leaves: no module imports an entry point (what it needs lives in a library module that
the command imports too), so changing a command's flags or output never reaches another command.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("protos", "services", "shapes", "trainer", "bench")
ALLOWED = {
    # The GenEval service can score shapes-world images with the exact detector (``--detector shapes``).
    ("services/geneval/detectors/shapes.py", "shapes"),
}


ENTRY_POINTS = {
    "trainer.run": "trainer/run.py",
    "trainer.evaluate": "trainer/evaluate.py",
    "trainer.experiments": "trainer/experiments.py",
    "trainer.sensitivity": "trainer/sensitivity.py",
    "shapes.pretrain": "shapes/pretrain.py",
    "shapes.evaluate": "shapes/evaluate.py",
    "services.serve": "services/serve.py",
    "services.torchserve": "services/torchserve/__main__.py",
}
"""The commands of the README and docs (``python -m NAME``). The bench scripts sit above everything and
are not listed; a few libraries also run as a small command (``services.client``, ``shapes.prompts``)."""


def imported_modules(path: Path) -> set[str]:
    """Every module name an import in ``path`` may refer to (``from a import b`` gives a and a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def imported_packages(path: Path) -> set[str]:
    """Top-level project packages a module imports (absolute imports, anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ORDER)


def against_the_direction() -> list[str]:
    rank = {name: i for i, name in enumerate(ORDER)}
    problems = []
    for package in ORDER:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = path.relative_to(ROOT).as_posix()
            for target in imported_packages(path):
                if rank[target] > rank[package] and (module, target) not in ALLOWED:
                    problems.append(f"{module} imports {target} ({package} must not depend on {target})")
    return problems


def test_no_import_points_against_the_direction() -> None:
    assert against_the_direction() == []


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from trainer.loop import Trainer\n    import bench.common\n")
    assert imported_packages(module) == {"trainer", "bench"}


def test_the_allowed_link_is_still_needed() -> None:
    for module, target in ALLOWED:
        assert target in imported_packages(ROOT / module), f"{module} no longer imports {target}: drop it"


def test_no_module_imports_an_entry_point() -> None:
    problems = []
    for package in ORDER:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = path.relative_to(ROOT).as_posix()
            for name in imported_modules(path) & set(ENTRY_POINTS):
                if ENTRY_POINTS[name] != module:
                    problems.append(f"{module} imports the command {name}")
    assert problems == []


def test_the_listed_entry_points_are_commands() -> None:
    for name, module in ENTRY_POINTS.items():
        source = (ROOT / module).read_text()
        assert module.endswith("__main__.py") or 'if __name__ == "__main__":' in source, name
