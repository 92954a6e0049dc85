"""The direction of imports, checked on the source with ast (README, "Architecture").

- ``foundation`` is the torch-free base every package imports (errors, the input spec, numerics,
  files, ORT sessions): it imports nothing of planforge but itself, and nothing but the standard
  library and NumPy (and ONNX Runtime in ``foundation.ort_session``).
- exporter and passes are siblings that never import each other (nor engines); what they share
  is in ``foundation``.
- engines' rooms are layered: a room imports only rooms above it in ``ROOMS``, and the shared
  modules (``engines.profiles``, ``engines.__init__``); the runtime stays lean.
- No import cycles between planforge's modules, function-local imports included (a local import
  must not hide a cycle), and no module imports another's private (``_name``) names.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("foundation", "exporter", "passes", "engines")
# each room may import those before it
ROOMS = ("bundle", "runtime", "trt_build", "build", "evaluate", "deploy", "serve", "cli")
SHARED = {"engines", "engines.profiles"}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path):
    """(imported module, imported names, line) for every import in the file, local ones included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, tuple(a.name for a in node.names), node.lineno


def _targets(module: str, names: tuple[str, ...]) -> set[str]:
    """The planforge modules an import statement loads (``from pkg import sub`` loads ``pkg.sub``)."""
    found = {module} if module in MODULES else set()
    found |= {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {t for mod, names, _ in _imports(p) for t in _targets(mod, names)} - {m} for m, p in MODULES.items()}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "engines" and parts[1] in ROOMS else None


@pytest.mark.parametrize("package, forbidden", [
    ("foundation", ("exporter", "passes", "engines", "torch")),
    ("exporter", ("passes", "engines")),
    ("passes", ("engines", "torch", "exporter")),
])
def test_imports_only_go_down(package, forbidden):
    bad = [(MODULES[m].relative_to(ROOT), mod) for m in MODULES if m.split(".")[0] == package
           for mod, _, _ in _imports(MODULES[m]) if mod.split(".")[0] in forbidden]
    assert bad == []


def test_the_foundation_imports_only_stdlib_numpy_and_itself():
    allowed = set(sys.stdlib_module_names) | {"numpy", "ml_dtypes", "foundation"}  # the standard library and NumPy
    checked = [m for m in MODULES if m.split(".")[0] == "foundation"]
    assert len(checked) >= 10
    for module in checked:
        imported = {mod for mod, _, _ in _imports(MODULES[module])}
        extra = {"onnxruntime"} if module == "foundation.ort_session" else set()  # its one job
        assert {m.split(".")[0] for m in imported} <= allowed | extra, (module, imported)


def test_no_import_cycles_between_modules():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    # a package importing its own submodules to re-export them is not a cycle of two modules
    real = [c for c in cycles if not all(c[0] == m or m.startswith(c[0] + ".") or c[0].startswith(m + ".")
                                         for m in c)]
    assert real == []


def test_rooms_import_only_the_rooms_above_them():
    bad = []
    for module, targets in _graph().items():
        room = _room(module)
        if module.startswith("engines") and room is None and module not in SHARED:
            bad.append((module, "is in no room"))
        for target in targets:
            other = _room(target)
            if target.startswith("engines") and target not in SHARED and other is None:
                bad.append((module, target))
            if module in SHARED - {"engines"} and target.startswith("engines"):
                bad.append((module, target))  # shared modules import no room
            if room and other and ROOMS.index(other) > ROOMS.index(room):
                bad.append((module, target))
    assert bad == []


def test_runtime_bundle_and_profiles_never_import_build_evaluate_or_cli():
    lower = [m for m in MODULES if _room(m) in ("runtime", "bundle") or m == "engines.profiles"]
    assert len(lower) >= 8
    graph = _graph()
    bad = [(m, t) for m in lower for t in graph[m] if _room(t) in ("build", "evaluate", "cli")]
    assert bad == []


def test_no_module_imports_another_modules_private_names():
    bad = [(m, mod, n) for m, path in MODULES.items() for mod, names, _ in _imports(path)
           for n in names if n.startswith("_") and not n.startswith("__") and mod.split(".")[0] in PACKAGES]
    assert bad == []


def test_the_runtime_stays_lean():
    code = ("import sys, engines.runtime, engines.bundle; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'onnx', 'onnx_graphsurgeon', 'polygraphy', 'click', 'rich', 'tensorrt', 'passes', "
            "'transformers', 'matplotlib', 'starlette', 'uvicorn', 'fastapi', 'jinja2') or m.startswith(( "
            "'engines.build', 'engines.serve', 'engines.evaluate', 'engines.cli', "
            "'exporter.zoo', 'exporter.resolve')))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == []
