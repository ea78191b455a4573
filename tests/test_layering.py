"""Import arrows point down only: lower layers of ntkit never import higher ones (parsed, not executed)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ntkit"

# level of each top-level module/subpackage; a module may import only from its own level or lower
LEVELS = {
    "_validation": 0,
    "_linalg": 0,
    "kernels": 0,
    "empirical": 1,
    "features": 2,
    "dynamics": 2,
    "spectra": 2,
    "estimators": 3,
    "experiments": 3,
    "reports": 3,
    "report": 3,
    "_progress": 0,
    "_dask": 0,
    "distributed": 3,
    "store": 2,
    "solvers": 2,
    "cli": 4,
    "__main__": 4,
    "__init__": 5,
}


def _top(module_path: Path) -> str:
    rel = module_path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imported_tops(path: Path):
    tree = ast.parse(path.read_text())
    pkg_parts = path.relative_to(PKG.parent).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg_parts[: len(pkg_parts) - node.level + 1])
                mod = base + (node.module.split(".") if node.module else [])
                names = [a.name for a in node.names] if not node.module else []
                if len(mod) >= 2 and mod[0] == "ntkit":
                    yield mod[1]
                elif len(mod) == 1 and mod[0] == "ntkit":
                    yield from names
            elif node.module and node.module.split(".")[0] == "ntkit":
                parts = node.module.split(".")
                if len(parts) > 1:
                    yield parts[1]
                else:
                    yield from (a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "ntkit" and len(parts) > 1:
                    yield parts[1]


def test_every_module_has_a_level():
    tops = {_top(p) for p in PKG.rglob("*.py")}
    assert tops <= set(LEVELS), f"add {sorted(tops - set(LEVELS))} to LEVELS in tests/test_layering.py"


def test_imports_point_down():
    bad = []
    for path in PKG.rglob("*.py"):
        top = _top(path)
        for imp in _imported_tops(path):
            if imp in LEVELS and LEVELS[imp] > LEVELS[top]:
                bad.append(f"{path.relative_to(PKG.parent)} imports ntkit.{imp}")
    assert not bad, "lower layers import higher ones:\n" + "\n".join(bad)


def _docstring_nodes(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                yield first.value


def test_package_never_reads_shared():
    # data paths are arguments: no string in the package's code (docstring examples aside) names ../shared
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        docs = {id(n) for n in _docstring_nodes(tree)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                assert "shared/" not in node.value, f"{path}:{node.lineno} hard-codes {node.value!r}"
