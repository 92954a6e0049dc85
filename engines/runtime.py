"""The shared runtime: load a bundle, check feeds against its input spec, run it.

    with engines.runtime.load("build/resnet18") as engine:
        outputs = engine.infer({"x": images})
        engine.stats()

``backend="auto"`` tries TensorRT (plan present and matching its sha256, tensorrt importable, a GPU,
the manifest's TensorRT version and compute capability equal to this machine's), then ONNX Runtime
CUDA, then ONNX Runtime CPU, logging one WARNING per skipped backend with the reason; an explicit
backend that cannot load is a ``BundleError`` with that reason. The CPU fallback never runs an FP16
graph. ``fallback_on_error=True`` retries a failed call on the next backend that loads.

Lean by design: NumPy, ONNX Runtime and planforge's standard-library modules only at import
(never torch, onnx, onnx-graphsurgeon or polygraphy); TensorRT and its CUDA binding are imported
by ``engines.runtime_trt`` only when that backend is chosen. Every artifact's sha256 is checked
against the manifest before anything deserializes it.

Concurrency: ``infer`` may be called from many threads on one engine and returns what the same
calls made one after another return. ONNX Runtime's ``InferenceSession.run`` is thread-safe; the
TensorRT runner keeps a pool of execution contexts (one per concurrent call); counters are
updated under a lock.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from engines.bundle import read_manifest, verified_path
from engines.cpu_isa import detect
from engines.profiles import Profile, select
from exporter.errors import BundleError, InferenceError, RuntimeInputError
from exporter.spec import InputSpec, OutputSpec

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "trt", "ort-cuda", "ort-cpu")
ORDER = ("trt", "ort-cuda", "ort-cpu")
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class _Meta:
    """Shape and dtype of a torch tensor, for the input check without copying it."""

    def __init__(self, tensor):
        self.shape = tuple(tensor.shape)
        self.dtype = str(tensor.dtype).removeprefix("torch.")


def _is_torch(value) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


class Stats:
    """Calls, errors, fallbacks and a latency histogram (milliseconds), thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.calls = self.errors = self.fallbacks = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.total_ms = 0.0

    def record(self, ms: float, error: bool = False) -> None:
        with self._lock:
            self.calls += 1
            self.errors += error
            self.total_ms += ms
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1

    def add_fallback(self) -> None:
        with self._lock:
            self.fallbacks += 1

    def snapshot(self) -> dict:
        with self._lock:
            edges = [*map(str, LATENCY_BUCKETS_MS), "inf"]
            return {"calls": self.calls, "errors": self.errors, "fallbacks": self.fallbacks,
                    "latency_ms": {"sum": self.total_ms, "buckets": dict(zip(edges, self.buckets))}}


class Runner:
    """One interface for every backend: ``infer``, ``input_specs``, ``output_specs``, context manager.

    Feeds are checked here, once, before a backend sees them; subclasses implement ``_run``.
    """

    backend = "base"
    takes_device_tensors = False  # TensorRT keeps CUDA tensors on the device

    def __init__(self, input_spec: InputSpec, outputs: list[OutputSpec], manifest: dict | None = None):
        self.input_spec = input_spec
        self.output_specs = outputs
        self.manifest = manifest or {}
        self._profiles = [Profile.from_json(p) for p in self.manifest.get("profiles", [])]
        self._stats = Stats()
        self._fallback_factory = None
        self._fallback: Runner | None = None
        self._metrics_created = False
        self._metrics = None

    @property
    def input_specs(self) -> InputSpec:
        return self.input_spec

    @property
    def profiles(self) -> list[dict]:
        return self.manifest.get("profiles", [])

    def stats(self) -> dict:
        return dict(self._stats.snapshot(), backend=self.backend)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {name: self._prepare(name, value) for name, value in feeds.items()}
        self.input_spec.check_feeds({k: _Meta(v) if _is_torch(v) else v for k, v in arrays.items()})
        if self._profiles:
            shapes = {k: tuple(v.shape) for k, v in arrays.items()}
            if select(self._profiles, shapes) is None:
                ranges = "; ".join(f"{p.name}: {dict((k, [list(p.min[k]), list(p.max[k])]) for k in p.min)}"
                                   for p in self._profiles)
                raise RuntimeInputError(f"no optimization profile accepts shapes { {k: list(v) for k, v in shapes.items()} }; "
                                        f"the bundle's profiles are {ranges}")
        start = time.perf_counter()
        try:
            outputs = self._run(arrays)
        except Exception as exc:  # noqa: BLE001 - a backend can fail in its own ways
            self._observe(start, error=True)
            return self._on_failure(feeds, exc)
        self._observe(start)
        return outputs

    def _observe(self, start: float, error: bool = False) -> None:
        ms = (time.perf_counter() - start) * 1000
        self._stats.record(ms, error)
        if not self._metrics_created:  # created at first use: subclasses set their backend label first
            self._metrics, self._metrics_created = _prometheus(self), True
        if self._metrics is not None:
            self._metrics.observe(ms, error)

    def _on_failure(self, feeds, exc: Exception):
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if self._fallback_factory is None:
            raise InferenceError(f"{self.backend} failed to run: {reason}; load with fallback_on_error=True "
                                 "to retry such calls on the next backend") from exc
        if self._fallback is None:
            self._fallback = self._fallback_factory()
        logger.warning("%s failed (%s); retrying on %s", self.backend, reason, self._fallback.backend)
        self._stats.add_fallback()
        if self._metrics is not None:
            self._metrics.fallback()
        return self._fallback.infer(feeds)

    def _prepare(self, name: str, value):
        if _is_torch(value):
            if self.takes_device_tensors:
                return value
            value = value.detach().cpu().numpy()  # torch itself is never imported here
        if not isinstance(value, np.ndarray):
            raise RuntimeInputError(f"input {name!r}: expected a NumPy array (or a torch tensor), found {type(value).__name__}")
        return np.ascontiguousarray(value)

    def _run(self, feeds: dict) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release the backend's resources."""
        if self._fallback is not None:
            self._fallback.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.backend} inputs={self.input_spec}>"


class OrtRunner(Runner):
    """ONNX Runtime on the CPU, or CUDA when its provider is installed and asked for."""

    def __init__(self, graph: Path, input_spec: InputSpec, outputs: list[OutputSpec], manifest: dict | None = None,
                 providers: tuple = ("CPUExecutionProvider",), threads: int | None = None):
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
        super().close()
        self.session = None


class _Bundle:
    """What every backend needs to know about the bundle, read once."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        try:
            self.spec = InputSpec.from_json(self.manifest["inputs"])
            self.outputs = [OutputSpec.from_json(o) for o in self.manifest["outputs"]]
            self.backends = self.manifest["backends"]
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{path}/manifest.json is missing or has a malformed {exc}; rebuild the bundle") from exc

    def ort_graph(self) -> Path:
        entry = self.backends.get("ort") or {}
        if not entry.get("graph"):
            raise BundleError(f"{self.path}: the manifest names no ONNX Runtime graph; rebuild the bundle")
        for extra in entry.get("external_data", []):
            verified_path(self.path, self.manifest, extra)
        return verified_path(self.path, self.manifest, entry["graph"])


def _why_not(backend: str, bundle: _Bundle) -> str | None:
    """Why ``backend`` cannot run this bundle here (None when it can)."""
    if backend == "trt":
        from engines.runtime_trt import unavailable  # noqa: PLC0415 - imports nothing heavy itself

        return unavailable(bundle.path, bundle.manifest)
    if backend == "ort-cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)"
    if backend == "ort-cpu" and (bundle.backends.get("ort") or {}).get("precision") == "fp16":
        return "the bundle's ONNX Runtime graph is FP16, which CPU kernels run slowly or not at all"
    return None


def _construct(backend: str, bundle: _Bundle, device: int, threads: int | None, cuda_graphs: bool = False) -> Runner:
    if backend == "trt":
        from engines.runtime_trt import TrtRunner  # noqa: PLC0415

        return TrtRunner(bundle.path, bundle.manifest, bundle.spec, bundle.outputs, device, cuda_graphs)
    providers = (("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider") if backend == "ort-cuda" \
        else ("CPUExecutionProvider",)
    if backend == "ort-cpu":
        _warn_if_validated_elsewhere(bundle)
    return OrtRunner(bundle.ort_graph(), bundle.spec, bundle.outputs, bundle.manifest, providers, threads)


def _warn_if_validated_elsewhere(bundle: _Bundle) -> None:
    """ONNX Runtime's integer kernels differ between CPU classes (``engines.cpu_isa``): an INT8 graph's
    accuracy holds for the class it was measured on."""
    if (bundle.backends.get("ort") or {}).get("precision") != "int8":
        return
    report = ((bundle.manifest.get("accuracy") or {}).get("int8") or {}).get("ort") or {}
    built, here = report.get("cpu_isa"), detect().isa
    if built and built != here:
        form = (report.get("form") or {}).get("form", "?")
        logger.warning("%s: its INT8 ONNX Runtime graph (form %s) was validated on a %s CPU, this CPU is %s: "
                       "its integer kernels may round or saturate differently; run 'planforge compare %s' to "
                       "re-validate it here, or rebuild the bundle on this CPU class", bundle.path, form, built,
                       here, bundle.path)


def load(bundle: str | Path, backend: str = "auto", device: int = 0, threads: int | None = None,
         fallback_on_error: bool = False, cuda_graphs: bool = False) -> Runner:
    """Load ``bundle`` on the first backend that fits (``auto``) or the one named.

    ``threads``: ONNX Runtime intra-op threads. ``cuda_graphs``: TensorRT replays CUDA graphs for
    repeated static shapes.
    """
    if backend not in BACKENDS:
        raise BundleError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    loaded = _Bundle(Path(bundle))
    order = ORDER if backend == "auto" else (backend,)
    reasons = []
    for i, name in enumerate(order):
        reason = _why_not(name, loaded)
        runner = None
        if reason is None:
            try:
                runner = _construct(name, loaded, device, threads, cuda_graphs)
            except BundleError as exc:
                reason = str(exc)
        if runner is None:
            if backend != "auto":
                raise BundleError(f"{bundle}: cannot run on {_label(name)}: {reason}")
            logger.warning("skipping %s: %s", _label(name), reason)
            reasons.append(f"{name}: {reason}")
            continue
        if fallback_on_error:
            rest = ORDER[ORDER.index(name) + 1:]
            runner._fallback_factory = lambda rest=rest: _first_available(rest, loaded, device, threads)
        return runner
    raise BundleError(f"{bundle}: no backend can run it here: " + "; ".join(reasons))


def _first_available(order: tuple[str, ...], bundle: _Bundle, device: int, threads: int | None) -> Runner:
    for name in order:
        if _why_not(name, bundle) is None:
            try:
                return _construct(name, bundle, device, threads)
            except BundleError as exc:
                logger.warning("fallback %s unavailable: %s", name, exc)
    raise InferenceError(f"no backend left to retry on after {order}")


def _label(backend: str) -> str:
    return {"trt": "TensorRT", "ort-cuda": "ONNX Runtime CUDA", "ort-cpu": "ONNX Runtime CPU"}[backend]


def _prometheus(runner: Runner):
    """Prometheus metrics when prometheus-client is installed (None otherwise)."""
    try:
        from engines.metrics import RunnerMetrics  # noqa: PLC0415
    except ImportError:
        return None
    return RunnerMetrics.create(runner)
