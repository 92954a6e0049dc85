"""Every TensorRT name planforge uses exists in the TensorRT 11.4 Python bindings.

The bindings wheel (``tensorrt-cu13-bindings==11.4.0.106``, a dev dependency) installs without
TensorRT's native libraries, so it cannot be imported; its ``tensorrt.so`` is read as bytes
instead. pybind11 registers every class, enum value, method and property by a NUL-terminated name
string; the linker may store a name as the tail of a longer string (``Logger`` inside
``ILogger``), so a name exists when some string ends with it. Python-level helpers (``nptype``)
come from the package's ``__init__.py``. The check is one-sided: a name that no string ends with
cannot exist in 11.4.
"""

import ast
import functools
import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST = "tensorrt-cu13-bindings"
VERSION = "11.4.0.106"


@functools.lru_cache(maxsize=1)
def _bindings():
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{DIST}=={VERSION} is a dev dependency: pip install -e '.[dev]'")
    assert dist.version == VERSION
    files = {f.name: Path(dist.locate_file(f)) for f in dist.files if f.name in ("tensorrt.so", "__init__.py")
             and f.parts[0] == "tensorrt_bindings" and len(f.parts) == 2}
    tokens = [t.decode("latin1") for t in files["tensorrt.so"].read_bytes().split(b"\0") if t]
    tree = ast.parse(files["__init__.py"].read_text())
    python = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    python |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    return tokens, frozenset(python)


def exists(name: str) -> bool:
    tokens, python = _bindings()
    return name in python or any(t.endswith(name) for t in tokens)


def used_names(source: str, objects: tuple[str, ...]) -> set[tuple[str, ...]]:
    """``trt.A.B`` chains, and attributes read or called on the local names in ``objects``."""
    chains = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        parts, base = [], node
        while isinstance(base, ast.Attribute):
            parts.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name) and (base.id == "trt" or base.id in objects):
            chains.add(tuple(reversed(parts)))
    return chains


def missing_names(source: str, objects: tuple[str, ...] = ()) -> list[str]:
    return sorted({".".join(chain) for chain in used_names(source, objects) if not all(exists(p) for p in chain)})


def test_every_tensorrt_name_used_under_engines_exists_in_the_11_4_bindings():
    from engines.trt_build.builder import TRT_OBJECTS

    checked = 0
    for path in sorted((ROOT / "engines").rglob("*.py")):
        source = path.read_text()
        objects = TRT_OBJECTS if "import tensorrt" in source else ()  # elsewhere `engine` is planforge's
        checked += len(used_names(source, objects))
        assert missing_names(source, objects) == [], path.name
    assert checked >= 30  # the build code really was read


def test_the_check_catches_names_tensorrt_11_removed():
    source = ("config.set_flag(trt.BuilderFlag.FP16)\n"
              "config.int8_calibrator = trt.IInt8EntropyCalibrator2()\n"
              "size = engine.device_memory_size\n"
              "ok = trt.BuilderFlag.TF32, engine.device_memory_size_v2, trt.nptype\n")
    assert missing_names(source, ("config", "engine")) == [
        "BuilderFlag.FP16", "IInt8EntropyCalibrator2", "device_memory_size", "int8_calibrator"]
