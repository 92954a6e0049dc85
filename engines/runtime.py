"""The shared runtime: load a bundle, check feeds against its input spec, run it.

    with engines.runtime.load("build/resnet18") as engine:
        outputs = engine.infer({"x": images})

Lean by design: this module imports only NumPy, ONNX Runtime and planforge's standard-library
modules (never torch, onnx, onnx-graphsurgeon or polygraphy), so a service can import it
anywhere. Every artifact's sha256 is checked against the manifest before ONNX Runtime reads it.

Concurrency: ``infer`` may be called from many threads on one engine; ONNX Runtime's
``InferenceSession.run`` is thread-safe and each call gets its own outputs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from engines.bundle import read_manifest, verified_path
from engines.profiles import Profile, select
from exporter.errors import BundleError, RuntimeInputError
from exporter.spec import InputSpec, OutputSpec

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "trt", "ort-cuda", "ort-cpu")


class Runner:
    """One interface for every backend: ``infer``, ``input_specs``, ``output_specs``, context manager.

    Feeds are checked here, once, before a backend sees them; subclasses implement ``_run``.
    """

    backend = "base"

    def __init__(self, input_spec: InputSpec, outputs: list[OutputSpec], manifest: dict | None = None):
        self.input_spec = input_spec
        self.output_specs = outputs
        self.manifest = manifest or {}
        self._profiles = [Profile.from_json(p) for p in self.manifest.get("profiles", [])]

    @property
    def input_specs(self) -> InputSpec:
        return self.input_spec

    @property
    def profiles(self) -> list[dict]:
        return self.manifest.get("profiles", [])

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {name: _as_array(name, value) for name, value in feeds.items()}
        self.input_spec.check_feeds(arrays)
        if self._profiles:
            shapes = {k: tuple(v.shape) for k, v in arrays.items()}
            if select(self._profiles, shapes) is None:
                ranges = "; ".join(f"{p.name}: {dict((k, [list(p.min[k]), list(p.max[k])]) for k in p.min)}"
                                   for p in self._profiles)
                raise RuntimeInputError(f"no optimization profile accepts shapes { {k: list(v) for k, v in shapes.items()} }; "
                                        f"the bundle's profiles are {ranges}")
        return self._run(arrays)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release the backend's resources."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.backend} inputs={self.input_spec}>"


def _as_array(name: str, value) -> np.ndarray:
    if not isinstance(value, np.ndarray) and hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()  # a torch tensor; torch itself is never imported here
    if not isinstance(value, np.ndarray):
        raise RuntimeInputError(f"input {name!r}: expected a NumPy array (or a torch tensor), found {type(value).__name__}")
    return np.ascontiguousarray(value)


class OrtRunner(Runner):
    """ONNX Runtime on the CPU (or CUDA, when its provider is installed and asked for)."""

    def __init__(self, graph: Path, input_spec: InputSpec, outputs: list[OutputSpec], manifest: dict | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), threads: int | None = None):
        super().__init__(input_spec, outputs, manifest)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(graph), options, providers=list(providers))
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise BundleError(f"ONNX Runtime cannot load {graph.name}: {str(exc).splitlines()[0][:300]}") from exc
        self.backend = "ort-cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "ort-cpu"
        self._names = [o.name for o in self.session.get_outputs()]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._names, self.session.run(self._names, feeds)))

    def close(self) -> None:
        self.session = None


def load(bundle: str | Path, backend: str = "auto", threads: int | None = None) -> Runner:
    """Load ``bundle`` on the first backend that fits (``auto``) or the one named."""
    if backend not in BACKENDS:
        raise BundleError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    try:
        spec = InputSpec.from_json(manifest["inputs"])
        outputs = [OutputSpec.from_json(o) for o in manifest["outputs"]]
        backends = manifest["backends"]
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{bundle}/manifest.json is missing or has a malformed {exc}; rebuild the bundle") from exc
    if backend in ("auto", "trt"):
        reason = (backends.get("trt") or {}).get("skipped") or "the TensorRT runtime path arrives with the runtime issue"
        if backend == "trt":
            raise BundleError(f"{bundle}: cannot run on TensorRT: {reason}")
        logger.warning("skipping TensorRT: %s", reason)
    if backend in ("auto", "ort-cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            reason = "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)"
            if backend == "ort-cuda":
                raise BundleError(f"{bundle}: cannot run on ONNX Runtime CUDA: {reason}")
            logger.warning("skipping ONNX Runtime CUDA: %s", reason)
        else:
            return _ort(bundle, manifest, spec, outputs, ("CUDAExecutionProvider", "CPUExecutionProvider"), threads)
    return _ort(bundle, manifest, spec, outputs, ("CPUExecutionProvider",), threads)


def _ort(bundle: Path, manifest: dict, spec: InputSpec, outputs: list[OutputSpec],
         providers: tuple[str, ...], threads: int | None) -> OrtRunner:
    entry = manifest["backends"].get("ort") or {}
    graph_name = entry.get("graph")
    if not graph_name:
        raise BundleError(f"{bundle}: the manifest names no ONNX Runtime graph; rebuild the bundle")
    graph = verified_path(bundle, manifest, graph_name)
    for extra in entry.get("external_data", []):
        verified_path(bundle, manifest, extra)
    return OrtRunner(graph, spec, outputs, manifest, providers, threads)
