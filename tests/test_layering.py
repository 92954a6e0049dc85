"""The direction of imports in ARCHITECTURE.md, checked on the source with ast."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# passes and exporter are siblings; the only modules they share are exporter's torch-free
# foundation (errors, spec), which import nothing but the standard library and NumPy.
FOUNDATION = {"exporter.core.errors", "exporter.core.spec"}


def _imports(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                yield path, [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, [node.module]


@pytest.mark.parametrize("package, forbidden", [
    ("exporter", ("passes", "engines")),
    ("passes", ("engines", "torch", "exporter")),
])
def test_imports_only_go_down(package, forbidden):
    bad = [(p.relative_to(ROOT), m) for p, mods in _imports(package) for m in mods
           if m.split(".")[0] in forbidden and m not in FOUNDATION]
    assert bad == []


def test_foundation_modules_import_only_stdlib_numpy_and_each_other():
    allowed = {"__future__", "dataclasses", "re", "typing", "numpy", "exporter", "ml_dtypes"}
    for name in FOUNDATION:
        path = ROOT / (name.replace(".", "/") + ".py")
        mods = [m for p, ms in _imports("exporter") if p == path for m in ms]
        assert {m.split(".")[0] for m in mods} <= allowed, (name, mods)
