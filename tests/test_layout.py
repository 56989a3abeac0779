"""The package's shape: no import cycle inside wpn_dist, and the layers import only downward
(library <- application <- benchmarks). Read from the source with ast, imports inside functions
included."""
import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "wpn_dist")
LAYERS = {"core": 0, "app": 1, "bench": 2}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(path: str, name: str, modules: set) -> set:
    """The wpn_dist modules ``path`` imports (a package import counts as its __init__)."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def graph() -> dict:
    paths = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                paths[module_name(path)] = path
    modules = set(paths)
    return {name: imports_of(path, name, modules) for name, path in paths.items()}


def test_no_import_cycle():
    edges = graph()
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import cycle: " + " -> ".join(trail + [node])
        state[node] = "open"
        for nxt in sorted(edges[node]):
            # A module importing its own package's __init__ for a name defined there is not a cycle
            # unless the __init__ imports it back, which the walk itself finds.
            visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(edges):
        visit(node, [])


def test_layers_import_only_downward():
    for name, targets in graph().items():
        layer = name.split(".")[1] if name.count(".") >= 1 else None
        if layer not in LAYERS:
            continue  # the command-line shims at the top import any layer
        for target in targets:
            other = target.split(".")[1] if target.count(".") >= 1 else None
            assert other is None or LAYERS.get(other, 99) <= LAYERS[layer], f"{name} imports {target}"
            assert other != "bench" or layer == "bench", f"{name} imports {target}"


def test_the_graph_sees_imports():
    """Guard against a walk that finds nothing: the trainer imports the method registry."""
    edges = graph()
    assert "wpn_dist.core.methods" in edges["wpn_dist.app.trainer"]
    assert "wpn_dist.app.distributed" in edges["wpn_dist.bench.launch"]
