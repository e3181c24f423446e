"""The package's layout rules, checked on the source: no import cycle between its packages (imports inside
functions count: they hide a cycle, they do not remove it), and only `backends/`, `kernels/` and the
standalone bundle files import a runtime (onnxruntime, tensorrt, tensorrt_rtx)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qwen3_compile"
RUNTIMES = ("onnxruntime", "tensorrt", "tensorrt_rtx")
MAY_IMPORT_RUNTIMES = ("backends", "kernels", "bundle/device")


def _modules() -> dict[str, Path]:
    """dotted name -> file, for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    """Every module named by an import anywhere in the file (relative imports resolved)."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _unit(module: str) -> str:
    """The package-level unit a module belongs to: `qwen3_compile.X` (a sub-package or a top-level module)."""
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        if module == "qwen3_compile":
            continue
        source = _unit(module)
        graph.setdefault(source, set())
        for name in _imports(path, module):
            if name.startswith("qwen3_compile.") and name in modules:
                target = _unit(name)
                if target != source:
                    graph[source].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_function_level_imports_count():
    source = "def f():\n    from qwen3_compile.lower import rules\n"
    tree_names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            tree_names.add(node.module)
    assert tree_names == {"qwen3_compile.lower"}  # ast.walk reaches into function bodies


def test_no_import_cycle_between_packages():
    graph = package_graph()
    assert len(graph) > 10  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_backends_and_kernels_import_runtimes():
    offenders = []
    for module, path in _modules().items():
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(MAY_IMPORT_RUNTIMES):
            continue
        used = {name.split(".")[0] for name in _imports(path, module)} & set(RUNTIMES)
        offenders += [f"{relative} imports {name}" for name in sorted(used)]
    assert offenders == []
