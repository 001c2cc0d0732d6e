"""The CRDT core stays pure: no trio, sockets, clock or randomness of its own."""

import ast
from pathlib import Path

import crdt

FORBIDDEN = {"trio", "socket", "time", "random", "asyncio", "datetime", "os", "secrets"}


def test_crdt_imports_nothing_impure():
    offenders = []
    for path in Path(crdt.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_crdt_imports_nothing_of_ours():
    for path in Path(crdt.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in modules if m.split(".")[0] in {"node", "stores", "discovery", "relay", "simulations"}}
