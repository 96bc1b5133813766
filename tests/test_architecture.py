"""The layout rules the methods redesign set: checked on the source, so they stay true."""

import ast
from pathlib import Path

from fedrouter.methods import methods

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "fedrouter"
# The strings methods were once told apart by (clustering and serving strategies)
STRATEGIES = {"kmeans", "task", "route", "shared", "personal", "overlay", "mix", "base"}


def _trees(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        yield path.relative_to(ROOT), ast.parse(path.read_text())


def test_no_module_imports_a_private_name_of_another():
    """Not the product's modules, nor the benchmarks and tests that use them."""
    found = [
        f"{path}: {node.module}.{alias.name}"
        for folder in (SRC, ROOT / "benchmarks", ROOT / "tests", ROOT / "tools")
        for path, tree in _trees(folder)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedrouter")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert found == []


def test_the_federated_layer_never_compares_a_method_name_or_strategy():
    """Server and client call the method's hooks; what differs between methods lives in the method's file."""
    words = set(methods()) | STRATEGIES
    found = []
    for path, tree in _trees(SRC / "federated"):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            constants = [c for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)]
            named = [
                o for o in operands if isinstance(o, ast.Attribute) and o.attr in ("name", "clustering", "serving")
            ]
            if any(c.value in words for c in constants if isinstance(c.value, str)) or named:
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_server_and_client_stay_readable():
    for name in ("server.py", "client.py"):
        lines = len((SRC / "federated" / name).read_text().splitlines())
        assert lines < 400, f"federated/{name} has {lines} lines"
