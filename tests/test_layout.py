"""The house rules of the layout, read from the source: data flows one way, and no class grows past a screenful or so."""

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "crdt", "discovery", "framing", "node", "p2p", "relay", "simulations", "stores")
CLASS_LINES_MAX = 300


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(module: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """Every project module `module` imports, at the top or lazily inside a function."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                yield name


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {module: set(_imports(module, path, modules)) for module, path in modules.items()}


def _unit(module: str) -> str:
    """The unit a module belongs to for the package rule: its top-level package, or inside node/ its subpackage (a
    module at node/'s root, such as the composition root node.app, is a unit of its own)."""
    parts = module.split(".")
    if parts[0] != "node" or len(parts) == 1:
        return parts[0]
    return ".".join(parts[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_module_imports_itself_back_through_others():
    assert _cycles(_graph()) == []


def test_packages_depend_one_way():
    units: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        units.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))
    assert _cycles(units) == []
    # The layers named in the README, checked for the edges that matter most.
    assert "cli" not in set().union(*(targets for unit, targets in units.items() if unit != "cli"))
    assert units["crdt"] == set()
    assert "node.api" not in units["node.net"] | units["node.sync"] | units["node.trust"]
    assert "node.net" not in units["node.sync"] | units["node.trust"]


def test_no_class_is_longer_than_a_few_screens():
    long_classes = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > CLASS_LINES_MAX:
                long_classes.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert long_classes == []


def test_the_layout_check_sees_a_circle_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _unit("node.net.host") == "node.net" and _unit("node.app") == "node.app" and _unit("relay.key") == "relay"
