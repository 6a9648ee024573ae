"""Imports point one way between the top-level packages: protos ← services ← shapes ← trainer ← bench.

services (the reward servers and the torch-free GenEval format) must not need the shapes world or the
trainer; shapes (a testbed model, its data and detector) must not need the trainer; the trainer must not
need the benchmarks. Lazy imports inside functions count too. The one link across is documented:
the GenEval service's ``shapes`` detector adaptor wraps the shapes world's exact detector.
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
