"""The package's shape: no import cycles, library apart from commands, the core free of Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kd_lightning"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the kd_lightning modules it imports (at any depth of the file: lazy imports count too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import submodule` imports the submodule; `from module import name` the module
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles, ignoring a package's own __init__ importing its submodules (how packages re-export)."""
    def real(a: str, b: str) -> bool:
        return not b.startswith(a + ".")

    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if not real(node, nxt):
                continue
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "kd_lightning.data.files" in graph["kd_lightning.data.decoded"]  # the graph sees real edges
    assert _cycles(graph) == []


def test_the_library_never_imports_the_commands():
    graph = import_graph()
    library = [m for m in graph if not m.startswith("kd_lightning.commands") and m != "kd_lightning.__main__"]
    assert library and not {m: sorted(e for e in graph[m] if e.startswith("kd_lightning.commands"))
                            for m in library if any(e.startswith("kd_lightning.commands") for e in graph[m])}


def test_the_training_step_has_no_lightning_in_it():
    """kd_lightning.core (the step) and what it imports run in a plain PyTorch loop."""
    graph, seen, todo = import_graph(), set(), ["kd_lightning.core"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [m for m in graph[module] if m != "kd_lightning.data"]  # the data package's __init__ re-exports
    for module in seen:
        source = (PACKAGE.parent / (module.replace(".", "/") + ".py"))
        source = source if source.is_file() else source.with_suffix("") / "__init__.py"
        assert "lightning" not in {n.split(".")[0] for n in _imported_names(source)}, module


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names
