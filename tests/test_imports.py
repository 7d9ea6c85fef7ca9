"""The package's imports point one way: no cycle, only the embedding API imports the
master, and the metrics read the status snapshot, never the parts of the master.

Every ``import`` and ``from ... import`` inside ``forkserver`` is read
with ``ast``, those under ``if TYPE_CHECKING:`` included (a cycle hidden
from the interpreter is still one for a reader), and the graph of
module-to-module edges must have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "forkserver"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, known: set[str]) -> set[str]:
    """The forkserver modules *path* imports, by their dotted names."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else \
        module_name(path)  # fmt: skip
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for full in names:
            name = full
            while name and name not in known:  # forkserver.x.attr -> forkserver.x
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    found.discard(module_name(path))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = [p for p in ROOT.rglob("*.py") if "examples" not in p.parts]
    known = {module_name(p) for p in paths}
    graph = {module_name(p): imported(p, known) for p in paths}
    # A package's __init__ re-exports its modules: importing "forkserver" is not an edge back.
    return {name: {dep for dep in deps if not name.startswith(dep + ".")}
            for name, deps in graph.items()}  # fmt: skip


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_only_the_embedding_api_imports_the_master() -> None:
    importers = {name for name, deps in import_graph().items() if "forkserver.master" in deps}
    assert importers <= {"forkserver.daemon"}, importers


#: The metrics are a view: each module may import only these of the package.
METRICS_IMPORTS = {
    "forkserver.metrics": {"forkserver.status"},  # the snapshot, nothing of the master
    "forkserver.statsd": {"forkserver.config", "forkserver.eventloop", "forkserver.metrics",
                          "forkserver.ratelimit"},
    "forkserver.tallies": {"forkserver.channel"},  # pure bookkeeping
    "forkserver.workers.timing": {"forkserver.channel"},
}


def test_the_metrics_read_the_snapshot_and_only_the_master_wires_them() -> None:
    graph = import_graph()
    for module, allowed in METRICS_IMPORTS.items():
        assert graph[module] <= allowed, (module, graph[module] - allowed)
    exporters = {name for name, deps in graph.items()
                 if deps & {"forkserver.metrics", "forkserver.statsd"}}  # fmt: skip
    assert exporters <= {"forkserver.master", "forkserver.statsd"}, exporters
    workers = {name for name in graph if name.startswith("forkserver.workers")}
    assert not {name for name in workers if "forkserver.tallies" in graph[name]
                or "forkserver.metrics" in graph[name]}  # fmt: skip


def test_the_cycle_check_can_see_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
