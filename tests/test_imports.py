"""The package's import graph: no cycles (counting imports inside functions too), layers point one way."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmkit"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the mmkit modules it imports anywhere in its source (module level or inside functions)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                root = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
                for candidate in (root, *(f"{root}.{alias.name}" for alias in node.names)):
                    if candidate in modules and candidate != name:
                        targets.add(candidate)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules and alias.name != name}
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "mmkit.training.loop" in graph["mmkit.training.vlm"]  # the walk sees imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_point_one_way():
    graph = import_graph()
    for name, targets in graph.items():
        if not name.startswith(("mmkit.cli", "mmkit.__main__")):  # python -m mmkit is the command line
            assert not {t for t in targets if t.startswith("mmkit.cli")}, f"{name} imports the command line"
        if name.startswith("mmkit.eval"):
            assert not {t for t in targets if t.startswith(("mmkit.training", "mmkit.diffusion"))}, name
        if name.startswith(("mmkit.ops", "mmkit.nn")):  # the core depends on nothing above it
            assert not {t for t in targets if t.split(".")[1] in ("models", "training", "connectors", "llm", "cli")}, name
