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


def component(module: str) -> str | None:
    """The picture's node of a project module name: ``services.X`` for the services' parts (the reward
    core, each scorer, the client…), the top-level package otherwise; None outside the project."""
    parts = module.split(".")
    if parts[0] not in ORDER:
        return None
    return ".".join(parts[:2]) if parts[0] == "services" and len(parts) > 1 else parts[0]


def component_graph() -> set[tuple[str, str]]:
    """(importer, imported) pairs of components, from every import anywhere in the project's files."""
    edges = set()
    for package in ORDER:
        for path in (ROOT / package).rglob("*.py"):
            source = component(".".join(path.relative_to(ROOT).with_suffix("").parts))
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    # ``from services import client`` names services.client, not the package itself
                    names = [f"{node.module}.{alias.name}" for alias in node.names]
                else:
                    continue
                for name in names:
                    target = component(name)
                    if target is not None and target != source:
                        edges.add((source, target))
    return edges


def mermaid(edges: set[tuple[str, str]]) -> str:
    """The import picture as a Mermaid flowchart: one box per top-level package, an arrow per import."""
    nodes = sorted({n for edge in edges for n in edge}, key=lambda n: (ORDER.index(n.split(".")[0]), n))
    ident = {n: n.replace(".", "_") for n in nodes}
    lines = ["flowchart BT"]
    for package in ORDER:
        members = [n for n in nodes if n.split(".")[0] == package]
        if package == "services":
            lines += ["  subgraph services", *(f"    {ident[n]}[{n}]" for n in members), "  end"]
        else:
            lines += [f"  {ident[n]}[{n}]" for n in members]
    lines += [f"  {ident[a]} --> {ident[b]}" for a, b in sorted(edges)]
    return "\n".join(lines) + "\n"


PICTURE = ROOT / "docs" / "architecture.md"


def split_picture(text: str) -> tuple[str, str, str]:
    """(text before, the Mermaid block's body, text after) of a page with one ```mermaid block."""
    head, rest = text.split("```mermaid\n", 1)
    body, tail = rest.split("```", 1)
    return head, body, tail


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


def test_the_import_picture_is_the_tree() -> None:
    """docs/architecture.md draws the imports as they are; regenerate it with
    ``python tests/test_import_direction.py``."""
    assert split_picture(PICTURE.read_text())[1] == mermaid(component_graph())


def test_the_picture_has_no_arrow_against_the_direction() -> None:
    rank = {name: i for i, name in enumerate(ORDER)}
    up = [(a, b) for a, b in component_graph() if rank[b.split(".")[0]] > rank[a.split(".")[0]]]
    assert up == [("services.geneval", "shapes")]  # the documented adaptor, ALLOWED above


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


if __name__ == "__main__":
    head, _, tail = split_picture(PICTURE.read_text())
    PICTURE.write_text(f"{head}```mermaid\n{mermaid(component_graph())}```{tail}")
    print(f"wrote {PICTURE.relative_to(ROOT)}")
