"""The import graph of our four packages: no circle between modules, no arrow pointing up.

Layers (shared/DESIGN.md, "Ownership"): server imports none of the others; sampler imports only
server; trainer only sampler and server; clients anything.

Every `import` / `from ... import` statement in a module counts as an arrow, wherever it stands:
a lazy import inside a function runs just the same once called, so it can close a circle at run
time as surely as a top-level one (and hiding an arrow in a function is how circles were "fixed"
before). Imports by string (importlib.import_module) are not seen; the code keeps those for
optional modules only. `from package import name` is an arrow to package.name when that is a
module of ours, else to the package. Arrows into a package's own __init__ from its submodules
(Python runs the parent first) are not counted: __init__ files here hold docstrings and at most
a lazy entry point.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "sampler", "trainer", "clients")
MAY_IMPORT = {
    "server": {"server"},
    "sampler": {"sampler", "server"},
    "trainer": {"trainer", "sampler", "server"},
    "clients": set(PACKAGES),
}


def module_name(path: Path) -> str:
    """server/weights/client.py -> flywheel.server.weights.client (pyproject's package-dir mapping)."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(["flywheel", *(parts[:-1] if parts[-1] == "__init__" else parts)])


def layer(module: str) -> str:
    return module.split(".")[1]


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def arrows(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (every import statement, top-level or lazy)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_walk_sees_lazy_and_relative_imports():
    graph = arrows(our_modules())
    assert "flywheel.server.weights.protocol" in graph["flywheel.server.weights.client"]  # top-level
    assert "flywheel.server.weights.client" in graph["flywheel.clients.up"]  # inside a method
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle():
    cycle = find_cycle(arrows(our_modules()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_upward_arrow():
    upward = sorted(
        f"{src} -> {dst}"
        for src, dsts in arrows(our_modules()).items()
        for dst in dsts
        if layer(dst) not in MAY_IMPORT[layer(src)]
    )
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_nothing_imports_the_folders_by_their_bare_names():
    """`import server` would load a second copy of a module beside flywheel.server (two PolicyState
    classes, two registries); the folders are only reachable as flywheel.* once installed."""
    bare = []
    for path in sorted(REPO.glob("*/**/*.py")):
        if ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            bare += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in PACKAGES]
    assert not bare, "import these as flywheel.*:\n" + "\n".join(bare)
