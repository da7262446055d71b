"""The package's import graph, read from the source with `ast` (imports inside functions
included): no module imports another that imports it back, the rollout pipeline never imports
the LightningModules, and the pure tensor math imports neither."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lit_opd"
CALLBACKS = ROOT / "callbacks"  # installed as lit_opd.callbacks
PURE_MATH = ("lit_opd.losses", "lit_opd.gates", "lit_opd.logprobs", "lit_opd.metrics")


def module_name(path: Path, root: Path, package: str) -> str:
    parts = (package, *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.Module, names: set[str]) -> set[str]:
    """The lit_opd modules a file imports anywhere in it: `import a.b`, `from a import b` (the
    submodule a.b where it is one, else a), at module level or inside a function."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in names else node.module
                         for alias in node.names)
    return {name for name in found if name in names}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path, root, package): path
             for root, package in ((PACKAGE, "lit_opd"), (CALLBACKS, "lit_opd.callbacks")) for path in root.rglob("*.py")}
    return {name: imported(ast.parse(path.read_text()), set(files)) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import cycle through each module that lies on one (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_rollout_pipeline_never_imports_the_modules():
    graph = import_graph()
    upward = {name: sorted(t for t in targets if t.startswith("lit_opd.modules"))
              for name, targets in graph.items() if name.startswith("lit_opd.rollout")}
    assert {name: targets for name, targets in upward.items() if targets} == {}


def test_the_pure_math_imports_neither_package():
    graph = import_graph()
    for name in PURE_MATH:
        assert not [t for t in graph[name] if t.startswith(("lit_opd.modules", "lit_opd.rollout"))], name


def test_the_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
